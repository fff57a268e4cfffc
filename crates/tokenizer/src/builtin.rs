//! The built-in tokenizer of sirocco's demo model: a byte-level BPE (so it takes any text) whose
//! merges are learnt, deterministically and in code, from a fixed list of common English words.
//!
//! Layout: ids 0 `<unk>`, 1 `<s>`, 2 `</s>`; ids 3..=258 the 256 byte-level symbols in byte order
//! (byte `b` is id `3 + b`); ids 259.. the merges, in the order they were learnt. The vocabulary
//! (and so the demo model's embedding table) must never change silently: the tests pin it.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

/// Size of the built-in tokenizer's vocabulary, special tokens included.
pub const BUILTIN_VOCAB_SIZE: usize = 512;

const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// Common English words, most frequent first (after the usual "1000 most common words" lists).
/// Only their order matters: it sets each word's weight in the merge training.
const WORDS: &str = "the of and to a in is it you that he was for on are with as I his they be \
at one have this from or had by not word but what some we can out other were all there when up \
use your how said an each she which do their time if will way about many then them write would \
like so these her long make thing see him two has look more day could go come did number sound \
no most people my over know water than call first who may down side been now find any new work \
part take get place made live where after back little only round man year came show every good \
me give our under name very through just form sentence great think say help low line differ \
turn cause much mean before move right boy old too same tell does set three want air well also \
play small end put home read hand port large spell add even land here must big high such follow \
act why ask men change went light kind off need house picture try us again animal point mother \
world near build self earth father head stand own page should country found answer school grow \
study still learn plant cover food sun four between state keep eye never last let thought city \
tree cross farm hard start might story saw far sea draw left late run while press close night \
real life few north open seem together next white children begin got walk example ease paper \
group always music those both mark often letter until mile river car feet care second book \
carry took science eat room friend began idea fish mountain stop once base hear horse cut sure \
watch color face wood main enough plain girl usual young ready above ever red list though feel \
talk bird soon body dog family direct pose leave song measure door product black short numeral \
class wind question happen complete ship area half rock order fire south problem piece told knew \
pass since top whole king space heard best hour better true during hundred five remember step \
early hold west ground interest reach fast verb sing listen six table travel less morning ten \
simple several vowel toward war lay against pattern slow center love person money serve appear \
road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry \
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive \
stood contain front teach week final gave green oh quick develop ocean warm free minute strong \
special mind behind clear tail produce fact street inch multiply nothing course stay wheel full \
force blue object decide surface deep moon island foot system busy test record boat common gold \
possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought \
heat snow tire bring yes distant fill east paint language among";

/// GPT-2's reversible map from bytes to printable characters, as `tokenizers`' ByteLevel uses.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next_unprintable = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            next_unprintable += 1;
            next_unprintable - 1
        };
        // Both ranges are below the surrogates, so this never falls back.
        map[usize::from(b)] = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    map
}

/// Learns the merges: plain BPE over the weighted word list, ties broken by the pair's text so
/// the result depends on nothing but this file.
fn learn_merges(bytes: &[char; 256], budget: usize) -> Vec<(String, String)> {
    let symbols = |s: &str| -> Vec<String> { s.bytes().map(|b| bytes[usize::from(b)].to_string()).collect() };
    let mut words: Vec<(Vec<String>, u64)> = Vec::new();
    for (rank, word) in WORDS.split_whitespace().enumerate() {
        // Zipf-like: a word's weight falls with its rank.
        let weight = 100_000 / (rank as u64 + 10);
        let mut capital = word.to_string();
        if let Some(first) = capital.get_mut(0..1) {
            first.make_ascii_uppercase();
        }
        // Mid-sentence words carry the space before them; sentence starts are rarer.
        words.push((symbols(&format!(" {word}")), weight));
        words.push((symbols(word), weight / 10));
        words.push((symbols(&capital), weight / 10));
    }
    // Whitespace runs of indented code and paragraph breaks.
    for (ws, weight) in [("  ", 2_000), ("    ", 1_500), ("\n\n", 1_500)] {
        words.push((symbols(ws), weight));
    }

    let mut merges = Vec::new();
    let mut learnt = std::collections::HashSet::new();
    while learnt.len() < budget {
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (syms, weight) in &words {
            for pair in syms.windows(2) {
                *counts.entry((&pair[0], &pair[1])).or_insert(0) += weight;
            }
        }
        // First maximum in key order: ties go to the lexicographically smallest pair.
        let Some(((a, b), _)) =
            counts
                .into_iter()
                .fold(None, |best: Option<((&str, &str), u64)>, (pair, n)| match best {
                    Some((_, m)) if m >= n => best,
                    _ => Some((pair, n)),
                })
        else {
            break;
        };
        let (a, b) = (a.to_string(), b.to_string());
        let merged = format!("{a}{b}");
        for (syms, _) in &mut words {
            let mut i = 0;
            while i + 1 < syms.len() {
                if syms[i] == a && syms[i + 1] == b {
                    syms[i] = merged.clone();
                    syms.remove(i + 1);
                }
                i += 1;
            }
        }
        learnt.insert(merged);
        merges.push((a, b));
    }
    merges
}

/// The built-in tokenizer's `tokenizer.json`.
pub(crate) fn builtin_json() -> Value {
    let bytes = byte_to_char();
    let mut vocab: HashMap<String, usize> = HashMap::new();
    for (id, tok) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert((*tok).to_string(), id);
    }
    for (b, c) in bytes.iter().enumerate() {
        vocab.insert(c.to_string(), SPECIAL_TOKENS.len() + b);
    }
    let budget = BUILTIN_VOCAB_SIZE - vocab.len();
    let merges = learn_merges(&bytes, budget);
    for (a, b) in &merges {
        let next = vocab.len();
        vocab.entry(format!("{a}{b}")).or_insert(next);
    }
    let vocab: serde_json::Map<String, Value> = vocab.into_iter().map(|(t, id)| (t, json!(id))).collect();
    let merges: Vec<Value> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    let added_tokens: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, tok)| {
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_matches_gpt2() {
        let map = byte_to_char();
        assert_eq!(map[usize::from(b'a')], 'a');
        assert_eq!(map[usize::from(b' ')], 'Ġ');
        assert_eq!(map[usize::from(b'\n')], 'Ċ');
        assert_eq!(map[usize::from(b'\t')], 'ĉ');
        assert_eq!(map[0], 'Ā');
        let distinct: std::collections::HashSet<char> = map.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn merges_fill_the_vocabulary_exactly() {
        let json = builtin_json();
        let vocab = json["model"]["vocab"].as_object().unwrap();
        assert_eq!(vocab.len(), BUILTIN_VOCAB_SIZE);
        let mut ids: Vec<u64> = vocab.values().map(|v| v.as_u64().unwrap()).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..BUILTIN_VOCAB_SIZE as u64).collect::<Vec<_>>());
        assert_eq!(
            json["model"]["merges"].as_array().unwrap().len(),
            BUILTIN_VOCAB_SIZE - 259
        );
    }
}
