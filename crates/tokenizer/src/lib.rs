//! Text <-> token ids for sirocco: loading Hugging Face `tokenizer.json` files (such as
//! Mistral's) or, with the `gguf` feature, the vocabulary inside a llama.cpp GGUF file;
//! the built-in byte-level BPE tokenizer of the demo model; streaming detokenization of
//! generated tokens; and chat templates (which Hugging Face keeps with the tokenizer).

mod builtin;
mod chat;
#[cfg(feature = "gguf")]
mod gguf;
mod pyjson;
mod stream;
mod tokenizer;

pub use builtin::BUILTIN_VOCAB_SIZE;
pub use chat::{ChatMessage, ChatTemplate, Tool, ToolCall};
pub use stream::StreamDecoder;
pub use tokenizer::{config_token, Tokenizer};
