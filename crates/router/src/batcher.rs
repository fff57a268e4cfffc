//! Continuous batching for one replica. Between decode steps, new requests join the
//! running batch as long as their KV cache fits; long prompts are prefilled in chunks
//! carried by the same steps as the running sequences' decode tokens, so streams
//! keep flowing while a long prompt is read. Finished and cancelled sequences free
//! their KV with the next step.

use crate::infer::{Entry, Event, Finish};
use crate::queue::Queue;
use crate::replica::Replica;
use crate::ModelInfo;
use sirocco_proto::shard::v1 as pb;
use sirocco_tokenizer::{StreamDecoder, Tokenizer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tonic::Status;

/// Limits of one replica's batch.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    /// Prompt tokens of one sequence per step.
    pub prefill_chunk: usize,
    /// Prompt tokens of all sequences together per step.
    pub prefill_budget: usize,
}

struct Running {
    entry: Entry,
    seq: u64,
    fed: usize,
    generated: Vec<u32>,
    decoder: Option<StreamDecoder>,
    /// Text decoded but held back because it could begin a stop sequence.
    pending: String,
    kv_slots: usize,
}

impl Running {
    fn prompt_len(&self) -> usize {
        self.entry.req.prompt_ids.len()
    }

    fn send(&self, ev: Event) -> bool {
        self.entry.tx.send(Ok(ev)).is_ok()
    }

    fn finish(&mut self, reason: Finish, stop: String) {
        self.send(Event::Finished {
            reason,
            prompt_tokens: self.prompt_len(),
            generated_tokens: self.generated.len(),
            stop,
        });
    }
}

/// Longest suffix of `text` that is a proper prefix of some stop sequence.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

pub struct Batcher {
    pub replica: Replica,
    pub queue: Arc<Queue>,
    pub tokenizer: Option<Tokenizer>,
    pub model: ModelInfo,
    pub config: BatchConfig,
    pub live_replicas: Arc<AtomicUsize>,
}

impl Batcher {
    /// Serves requests until the replica fails; then fails its requests and returns.
    pub async fn run(self) {
        let mut running: Vec<Running> = Vec::new();
        let mut release: Vec<u64> = Vec::new();
        let mut next_seq: u64 = 1;
        let mut step_id: u64 = 0;
        loop {
            self.admit(&mut running, &mut next_seq);
            running.retain(|r| {
                if r.entry.tx.is_closed() {
                    tracing::info!(request_id = %r.entry.req.id, "client went away; request cancelled");
                    release.push(r.seq);
                    false
                } else {
                    true
                }
            });
            if running.is_empty() {
                if !release.is_empty() {
                    let req = pb::StepRequest {
                        step_id,
                        seqs: Vec::new(),
                        release: std::mem::take(&mut release),
                    };
                    step_id += 1;
                    if let Err(e) = self.replica.step(req).await {
                        self.fail(&mut running, e);
                        return;
                    }
                    continue;
                }
                let notified = self.queue.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.queue.is_empty() {
                    notified.await;
                }
                continue;
            }

            let (seqs, index) = self.build_step(&running);
            let req = pb::StepRequest {
                step_id,
                seqs: seqs.clone(),
                release: std::mem::take(&mut release),
            };
            step_id += 1;
            let resp = match self.replica.step(req).await {
                Ok(r) => r,
                Err(e) => {
                    self.fail(&mut running, e);
                    return;
                }
            };
            let results: HashMap<u64, pb::SeqResult> = resp.results.into_iter().map(|r| (r.seq_id, r)).collect();
            for s in &seqs {
                let i = index[&s.seq_id];
                let r = &mut running[i];
                if r.fed < r.prompt_len() {
                    r.fed += s.tokens.len();
                }
                if let Some(token) = results.get(&s.seq_id).and_then(|x| x.token) {
                    let res = &results[&s.seq_id];
                    if self.on_token(r, token, res) {
                        release.push(r.seq);
                    }
                }
            }
            running.retain(|r| !release.contains(&r.seq));
        }
    }

    fn kv_in_use(running: &[Running]) -> usize {
        running.iter().map(|r| r.kv_slots).sum()
    }

    fn admit(&self, running: &mut Vec<Running>, next_seq: &mut u64) {
        while running.len() < self.config.max_batch_size {
            let free = self.model.kv_capacity_tokens.saturating_sub(Self::kv_in_use(running));
            let model = &self.model;
            let Some(entry) = self
                .queue
                .pop_if(|e| model.kv_slots_needed(e.req.prompt_ids.len() + e.req.max_new_tokens) <= free)
            else {
                break;
            };
            let kv_slots = model.kv_slots_needed(entry.req.prompt_ids.len() + entry.req.max_new_tokens);
            tracing::debug!(
                request_id = %entry.req.id,
                replica = self.replica.id,
                queued_ms = entry.enqueued.elapsed().as_millis() as u64,
                "request admitted"
            );
            let decoder = self
                .tokenizer
                .as_ref()
                .map(|t| StreamDecoder::new(t, &entry.req.prompt_ids));
            running.push(Running {
                entry,
                seq: *next_seq,
                fed: 0,
                generated: Vec::new(),
                decoder,
                pending: String::new(),
                kv_slots,
            });
            *next_seq += 1;
        }
    }

    /// Decode tokens for every sequence past its prompt, then prompt chunks within
    /// the prefill budget, oldest first.
    fn build_step(&self, running: &[Running]) -> (Vec<pb::SeqStep>, HashMap<u64, usize>) {
        let mut seqs = Vec::new();
        let mut index = HashMap::new();
        for (i, r) in running.iter().enumerate() {
            if r.fed >= r.prompt_len() {
                seqs.push(pb::SeqStep {
                    seq_id: r.seq,
                    tokens: vec![*r.generated.last().expect("a decoding sequence has sampled")],
                    sample: true,
                    params: None,
                    replayed: 0,
                    return_logits: false,
                    top_logprobs: r.entry.req.top_logprobs as u32,
                });
                index.insert(r.seq, i);
            }
        }
        let mut budget = self.config.prefill_budget;
        for (i, r) in running.iter().enumerate() {
            if r.fed >= r.prompt_len() || budget == 0 {
                continue;
            }
            let n = (r.prompt_len() - r.fed).min(self.config.prefill_chunk).min(budget);
            budget -= n;
            let last = r.fed + n == r.prompt_len();
            seqs.push(pb::SeqStep {
                seq_id: r.seq,
                tokens: r.entry.req.prompt_ids[r.fed..r.fed + n].to_vec(),
                sample: last,
                params: (r.fed == 0).then(|| sirocco_shard_params(&r.entry.req.params)),
                replayed: 0,
                return_logits: false,
                top_logprobs: if last { r.entry.req.top_logprobs as u32 } else { 0 },
            });
            index.insert(r.seq, i);
        }
        (seqs, index)
    }

    /// Handles a sampled token; returns true when the sequence is finished.
    fn on_token(&self, r: &mut Running, token: u32, res: &pb::SeqResult) -> bool {
        r.generated.push(token);
        let req = &r.entry.req;
        let is_eos = !req.ignore_eos && self.model.eos_ids.contains(&token);
        let delta = match r.decoder.as_mut() {
            Some(d) => d.push(token).unwrap_or_default(),
            None => String::new(),
        };
        r.pending.push_str(&delta);
        let mut finish = None;
        if is_eos {
            finish = Some((Finish::Eos, String::new()));
        } else if req.stop_token_ids.contains(&token) {
            let text = self
                .tokenizer
                .as_ref()
                .and_then(|t| t.id_to_piece(token))
                .unwrap_or_default();
            finish = Some((Finish::Stop, text));
        }
        let stop_hit = req
            .stop_sequences
            .iter()
            .filter_map(|s| r.pending.find(s.as_str()).map(|p| (p, s.clone())))
            .min_by_key(|(p, _)| *p);
        if finish.is_none() && r.generated.len() >= req.max_new_tokens {
            finish = Some((Finish::Length, String::new()));
        }
        let emit = if let Some((pos, stop)) = stop_hit {
            // The stop sequence and whatever follows it are not returned.
            let text = r.pending[..pos].to_string();
            r.pending.clear();
            finish = Some((Finish::Stop, stop));
            text
        } else if finish.is_some() {
            // Ending: held-back text, and an incomplete character flushed lossily, go
            // out with this last token.
            let mut text = std::mem::take(&mut r.pending);
            if let Some(d) = r.decoder.as_mut() {
                text.push_str(&d.finish().unwrap_or_default());
            }
            text
        } else {
            let keep = held_back(&r.pending, &req.stop_sequences);
            r.pending.drain(..r.pending.len() - keep).collect()
        };
        let logprob = req.logprobs.then_some(res.logprob);
        let top = res.top_logprobs.iter().map(|t| (t.id, t.logprob)).collect();
        let delivered = r.send(Event::Token {
            id: token,
            text: emit,
            logprob,
            top_logprobs: top,
        });
        if !delivered {
            return true;
        }
        match finish {
            Some((reason, stop)) => {
                r.finish(reason, stop);
                true
            }
            None => false,
        }
    }

    /// The replica failed: its requests end with UNAVAILABLE, and if it was the last
    /// replica, so do the queued ones.
    fn fail(&self, running: &mut Vec<Running>, err: anyhow::Error) {
        tracing::error!(replica = self.replica.id, error = %format!("{err:#}"), "replica failed; taking it out of rotation");
        let msg = format!("replica {} failed: {err:#}", self.replica.id);
        for r in running.drain(..) {
            let _ = r.entry.tx.send(Err(Status::unavailable(msg.clone())));
        }
        if self.live_replicas.fetch_sub(1, Ordering::SeqCst) == 1 {
            for e in self.queue.drain() {
                let _ = e.tx.send(Err(Status::unavailable("no replica is serving")));
            }
        }
    }
}

fn sirocco_shard_params(p: &sirocco_sampling::SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        seed: p.seed,
    }
}
