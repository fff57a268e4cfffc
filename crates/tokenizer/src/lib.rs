//! Text <-> token ids for sirocco: loading Hugging Face `tokenizer.json` files (such as
//! Mistral's) or the vocabulary inside a llama.cpp GGUF file, the built-in byte-level BPE tokenizer of the demo model, and streaming
//! detokenization of generated tokens.

mod builtin;
mod gguf;
mod stream;
mod tokenizer;

pub use builtin::BUILTIN_VOCAB_SIZE;
pub use stream::StreamDecoder;
pub use tokenizer::{config_token, Tokenizer};
