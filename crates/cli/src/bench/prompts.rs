//! Text prompts for servers that take no token ids (chat APIs, other serving systems):
//! sentences drawn from a small built-in corpus, or the first human turns of a
//! ShareGPT-style dataset. Every draw is seeded, and a seed differs from run to run by
//! default, so a server's prompt cache cannot answer a repeated run from memory.

use super::workload::{length_range, Prompt};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use sirocco_tokenizer::Tokenizer;
use std::path::Path;

/// Plain English prose written for this corpus; any sentence may follow any other.
const CORPUS: &[&str] = &[
    "The river rose in the night and by morning the lower fields were under a sheet of brown water.",
    "My grandmother kept her letters in a tin box that smelled faintly of cloves and old paper.",
    "A lighthouse keeper must trust the clock more than the sky, for fog can fall within a minute.",
    "The train was late again, so the passengers stood on the platform and talked about the weather.",
    "Bees will travel several miles from the hive when the nearer flowers have been picked clean.",
    "He mended the fence with wire from the barn, though he knew the goats would find another gap.",
    "In winter the harbour grew quiet, and the fishing boats sat in rows like sleeping animals.",
    "She learned to read the stars from a sailor who had crossed the southern ocean eleven times.",
    "The library closed at six, but the old caretaker let the students stay until the lamps were out.",
    "Bread rises best in a warm kitchen, away from the draught that comes under the back door.",
    "When the wind turned to the east, the whole town smelled of salt and drying seaweed.",
    "The surveyor measured the hill twice, because the first figure seemed far too large to believe.",
    "Children gathered chestnuts in the park and roasted them on a shovel over the open fire.",
    "A good map tells you not only where the roads go but also where the walking is pleasant.",
    "The clockmaker's shop was full of ticking, and no two clocks ever agreed on the hour.",
    "After the storm, the beach was covered with shells, driftwood and a single green bottle.",
    "Every spring the swallows returned to the same barn and built their nests beneath the beams.",
    "The doctor rode out to the farm in the rain, carrying his bag under a borrowed oilskin coat.",
    "Copper turns green in the open air, which is why the old church roof looks like moss.",
    "They planted the orchard in rows so straight that the trees seemed to march down the valley.",
    "The market opened before dawn, and by noon the best fruit had already been sold.",
    "A careful cook tastes the soup at every stage rather than trusting the recipe alone.",
    "The bridge was built of stone from the quarry on the far side of the hill.",
    "On clear evenings the whole village could hear the band practising in the school hall.",
    "The ship's log recorded fair winds for nine days and then a sudden, violent squall.",
    "Snow lay on the mountain long after the meadows below had turned green with new grass.",
    "The printer set each line of type by hand, reading the letters backwards without a pause.",
    "An old road follows the easiest ground, which is why it bends around every marsh and hill.",
    "The teacher asked the class to describe the view from the window in a single sentence.",
    "Lanterns were hung along the pier so the late boats could find their way home.",
    "The miller said the stream ran faster this year than at any time he could remember.",
    "A fox crossed the frozen pond at dusk, leaving a neat line of prints in the frost.",
    "The museum's oldest clock had not run for a century, yet visitors still stopped to look at it.",
    "Rain on a tin roof is loud at first, but after an hour it becomes a kind of music.",
    "The cartographer left the northern coast blank, since no ship had yet returned from it.",
    "Her garden was small, but she grew enough beans and onions to last the family all winter.",
    "The postman knew every dog on his route and carried biscuits for the friendly ones.",
    "Evening light came through the tall windows and lay in long yellow bars across the floor.",
    "The engineers tested the new pump for a week before they trusted it with the mine.",
    "Some questions are best answered by walking, slowly, until the answer arrives on its own.",
];

/// Words per token, roughly, for English under common tokenizers; used to size prompts
/// when no tokenizer is given.
const WORDS_PER_TOKEN: f64 = 0.75;

/// `n` prompts of about `len` tokens (within ±`range`), each a fresh shuffle of the
/// corpus behind a random tag, so no two prompts share a cacheable prefix. With a
/// tokenizer the length is exact to a sentence; without, it is estimated from words.
pub fn corpus(rng: &mut ChaCha8Rng, n: usize, len: usize, range: f64, tok: Option<&Tokenizer>) -> Result<Vec<Prompt>> {
    let (lo, hi) = length_range(len, range);
    let mut order: Vec<usize> = (0..CORPUS.len()).collect();
    (0..n)
        .map(|_| {
            let want = rng.random_range(lo..=hi);
            let mut text = format!("[{:08x}]", rng.random::<u32>());
            order.shuffle(rng);
            for &i in order.iter().cycle() {
                let size = match tok {
                    Some(t) => t.encode(&text, false)?.len(),
                    None => (text.split_whitespace().count() as f64 / WORDS_PER_TOKEN) as usize,
                };
                if size >= want {
                    break;
                }
                text.push(' ');
                text.push_str(CORPUS[i]);
            }
            Ok(Prompt::Text(text))
        })
        .collect()
}

/// The first human turn of each ShareGPT-style record (`{"conversations": [{"from":
/// "human", "value": ...}, ...]}`), from JSON lines or one JSON array.
pub fn dataset_turns(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let records: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).with_context(|| format!("{} is not a JSON array", path.display()))?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: bad JSON", path.display(), i + 1)))
            .collect::<Result<_>>()?
    };
    let turns: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r["conversations"]
                .as_array()?
                .iter()
                .find(|t| matches!(t["from"].as_str(), Some("human" | "user")))?["value"]
                .as_str()
                .filter(|v| !v.trim().is_empty())
                .map(String::from)
        })
        .collect();
    if turns.is_empty() {
        bail!(
            "{} has no record with a human turn ({{\"conversations\": [{{\"from\": \"human\", \"value\": ...}}]}})",
            path.display()
        );
    }
    Ok(turns)
}

/// `n` prompts drawn from `turns` in a seeded order (repeating only past its end).
pub fn from_dataset(rng: &mut ChaCha8Rng, turns: &[String], n: usize) -> Vec<Prompt> {
    let mut order: Vec<usize> = (0..turns.len()).collect();
    order.shuffle(rng);
    order
        .iter()
        .cycle()
        .take(n)
        .map(|&i| Prompt::Text(turns[i].clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn texts(seed: u64) -> Vec<String> {
        corpus(&mut ChaCha8Rng::seed_from_u64(seed), 4, 40, 0.0, None)
            .unwrap()
            .into_iter()
            .map(|p| match p {
                Prompt::Text(t) => t,
                Prompt::Ids(_) => unreachable!("corpus prompts are text"),
            })
            .collect()
    }

    #[test]
    fn corpus_prompts_follow_the_seed_and_length() {
        assert_eq!(texts(1), texts(1));
        assert_ne!(texts(1), texts(2));
        for t in texts(3) {
            let words = t.split_whitespace().count();
            assert!((30..60).contains(&words), "{words} words: {t}");
        }
        let tok = Tokenizer::builtin();
        let p = corpus(&mut ChaCha8Rng::seed_from_u64(0), 2, 50, 0.0, Some(&tok)).unwrap();
        for p in p {
            let Prompt::Text(t) = p else { unreachable!() };
            let n = tok.encode(&t, false).unwrap().len();
            assert!((50..90).contains(&n), "{n} tokens");
        }
    }

    #[test]
    fn dataset_takes_the_first_human_turn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"conversations\": [{\"from\": \"gpt\", \"value\": \"x\"}, {\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"human\", \"value\": \"later\"}]}\n\n{\"conversations\": []}\n",
        )
        .unwrap();
        assert_eq!(dataset_turns(&path).unwrap(), ["hi"]);
        std::fs::write(&path, "{\"conversations\": []}\n").unwrap();
        assert!(dataset_turns(&path).unwrap_err().to_string().contains("no record"));
    }
}
