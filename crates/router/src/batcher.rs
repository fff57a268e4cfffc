//! Continuous batching for one replica. Between decode steps, new requests join the
//! running batch as long as their KV cache fits; long prompts are prefilled in chunks
//! carried by the same steps as the running sequences' decode tokens, so streams
//! keep flowing while a long prompt is read. Finished and cancelled sequences free
//! their KV with the next step.
//!
//! When the replica fails, its requests go back to the head of the queue with what
//! they already streamed; another replica re-admits each by prefilling its prompt
//! plus those tokens, and the stream goes on where it stopped.

use crate::cluster::ClusterBoard;
use crate::load::{IndexSize, LoadBoard, Readiness};
use crate::queue::{effective_priority, Queue};
use crate::replica::{Replica, StepFuture};
use crate::request::{Entry, Event};
use crate::step_deadline::StepDeadline;
use crate::ModelInfo;
use sirocco_metrics::RouterMetrics;
use sirocco_proto::shard::v1 as pb;
use sirocco_scheduler::{
    FinishReason, Holder, Planned, Planner, Scheduled, SchedulerConfig, StopCriteria, StopMatch, Work,
};
use sirocco_tokenizer::{StreamDecoder, Tokenizer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

/// How one replica's batch is run.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// Batch size, prefill chunk and budget (the planner's policy).
    pub schedule: SchedulerConfig,
    /// How long requests of a failed replica wait for another one before failing.
    pub failover_timeout: Duration,
    /// An idle replica runs a one-token canary step this often, so that readiness
    /// means "completed a forward step and collective recently".
    pub canary_interval: Duration,
    /// A canary slower than this fails the replica (a stalled rank or collective).
    pub canary_timeout: Duration,
    /// Any step slower than this fails the replica, however slow the replica's pace.
    pub step_timeout: Duration,
    /// A step may always take this long; beyond it, a step much slower than the
    /// replica's recent pace fails the replica ([`StepDeadline`]).
    pub step_deadline_floor: Duration,
    /// Requests start from the shards' prefix cache (unless they opt out), and go to
    /// the replica most likely to hold their prefix.
    pub prefix_cache: bool,
    /// A warm replica is preferred unless it runs more than this many sequences
    /// beyond the least busy replica.
    pub route_imbalance: usize,
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The sequence id canary steps use (never a request's).
const CANARY_SEQ: u64 = u64::MAX;

struct Running {
    entry: Entry,
    seq: u64,
    /// What this replica prefills: the prompt, plus tokens generated on a replica
    /// that failed.
    input: Vec<u32>,
    /// How many tokens at the end of `input` were generated earlier.
    replayed: usize,
    fed: usize,
    kv_slots: usize,
    /// Whether it starts from the prefix cache; false once attached.
    attach: bool,
    /// Leading input tokens the prefix cache held (for a forked sample, its
    /// sibling's).
    cached: usize,
    /// Where its own prefill starts: after the prefix cache's tokens, or its fork.
    /// The step that reads from there carries its parameters and id.
    from: usize,
    /// Ended with an error during this step (its client was told): its result is
    /// dropped and it is released.
    failed: bool,
    /// A sample waiting to start as a fork of this sibling sequence once it has
    /// read all its prompt but the last token ([`Batcher::fork_ready`]).
    fork_from: Option<u64>,
    /// Reads its input only up to the last token, for siblings to fork from it.
    holds: bool,
}

impl Scheduled for Running {
    fn input_len(&self) -> usize {
        self.input.len()
    }
    fn fed(&self) -> usize {
        self.fed
    }
    fn waiting(&self) -> bool {
        self.attach || self.fork_from.is_some()
    }
    fn readable(&self) -> usize {
        self.input.len() - usize::from(self.holds)
    }
}

impl Running {
    fn send(&self, ev: Event) -> bool {
        self.entry.tx.send(Ok(ev))
    }

    fn finish(&mut self, reason: FinishReason, stop: String, metrics: &RouterMetrics) {
        let label = match reason {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop_sequence",
            FinishReason::Cancelled => "cancelled",
        };
        metrics.request_ended("success", label);
        metrics
            .request_generated_tokens
            .observe(self.entry.progress.generated.len() as f64);
        metrics
            .request_duration
            .observe(self.entry.enqueued.elapsed().as_secs_f64());
        let prompt_tokens = self.entry.req.prompt_ids.len();
        self.send(Event::Finished {
            reason,
            prompt_tokens,
            generated_tokens: self.entry.progress.generated.len(),
            stop,
            cached_prompt_tokens: self.cached.min(prompt_tokens),
        });
    }
}

pub struct Batcher {
    pub replica: Replica,
    pub queue: Arc<Queue>,
    pub tokenizer: Option<Tokenizer>,
    pub model: ModelInfo,
    pub config: BatchConfig,
    pub live_replicas: Arc<AtomicUsize>,
    pub loads: Arc<LoadBoard>,
    pub control: tokio::sync::watch::Receiver<Control>,
    pub metrics: Arc<RouterMetrics>,
    pub readiness: Arc<Readiness>,
    pub board: Arc<ClusterBoard>,
    pub deadline: StepDeadline,
    /// A step given up on (its replica hung or left): seen through after the batcher
    /// ends, see [`Batcher::run`].
    pub abandoned: Option<StepFuture>,
}

/// How long a step given up on may still finish before its replica's connections
/// close. Longer than the shards' collective timeout: a rank that was paused
/// finishes the step with its peers instead of leaving them to time out and exit.
const ABANDONED_GRACE: Duration = Duration::from_secs(60);

/// What membership says a replica should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Serve,
    /// Take no new requests; finish the running ones, then leave.
    Drain,
    /// The replica left the cluster (a lease expired, a key vanished): fail over now.
    Gone,
}

impl Batcher {
    /// Serves requests until the replica fails; then hands its requests back to the
    /// queue and returns. A step it gave up on still runs on the shards (a paused
    /// rank resumes it): the replica's connections and session stay open until that
    /// step ends, so every rank sees it through and none is left waiting in the
    /// collective for a peer that was told to forget it.
    pub async fn run(mut self) {
        self.serve().await;
        if let Some(step) = self.abandoned.take() {
            let replica = self.replica;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(ABANDONED_GRACE, step).await;
                drop(replica);
            });
        }
    }

    async fn serve(&mut self) {
        let mut running: Vec<Running> = Vec::new();
        let mut release: Vec<u64> = Vec::new();
        let mut next_seq: u64 = 1;
        let mut step_id: u64 = 0;
        let mut draining = false;
        let planner = self.planner();
        // Ready means a real forward step and collective have completed.
        if let Err(e) = self.canary(&mut step_id).await {
            self.fail(running, e.context("first canary step failed"));
            return;
        }
        loop {
            let control = *self.control.borrow_and_update();
            match control {
                Control::Serve => {}
                Control::Drain => {
                    if !draining {
                        tracing::info!(replica = self.replica.id, running = running.len(), "replica draining");
                        self.board.set_state(self.replica.id, crate::cluster::State::Draining);
                        // Others take the queue from here.
                        self.loads.remove(self.replica.id);
                        self.queue.wake();
                    }
                    draining = true;
                }
                Control::Gone => {
                    self.fail(running, anyhow::anyhow!("it left the cluster membership"));
                    return;
                }
            }
            if draining && running.is_empty() && release.is_empty() {
                tracing::info!(replica = self.replica.id, "replica drained");
                self.leave();
                return;
            }
            if !draining {
                self.admit(&planner, &mut running, &mut next_seq, &mut release);
            }
            if let Err(e) = self.attach(&mut running, &mut release, &mut step_id).await {
                self.fail(running, e.context("a prefix-cache lookup failed"));
                return;
            }
            let now = std::time::Instant::now();
            running.retain(|r| {
                let outcome = if r.entry.tx.is_closed() {
                    tracing::info!(request_id = %r.entry.req.id, "client went away; request cancelled");
                    "cancelled"
                } else if r.entry.req.deadline.is_some_and(|d| d <= now) {
                    tracing::warn!(request_id = %r.entry.req.id, generated = r.entry.progress.generated.len(), "request's deadline passed while running; cancelled");
                    let _ = r.entry.tx.send(Err(crate::infer::deadline_exceeded(r.entry.enqueued.elapsed(), false)));
                    "deadline_exceeded"
                } else {
                    return true;
                };
                self.metrics.request_ended(outcome, "cancelled");
                self.metrics.running_sequences.dec();
                self.queue.ended(self.replica.id, 1);
                release.push(r.seq);
                false
            });
            if running.is_empty() {
                if !release.is_empty() {
                    let req = pb::StepRequest {
                        step_id,
                        seqs: Vec::new(),
                        release: std::mem::take(&mut release),
                        ..Default::default()
                    };
                    step_id += 1;
                    if let Err(e) = self.timed_step(req, None).await {
                        self.fail(running, e);
                        return;
                    }
                    continue;
                }
                let queue = self.queue.clone();
                let notified = queue.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.queue.is_empty() || draining {
                    tokio::select! {
                        _ = notified => {}
                        _ = self.control.changed() => {}
                        _ = self.replica.session_lost() => {
                            self.fail(running, anyhow::anyhow!("its session on a shard ended"));
                            return;
                        }
                        _ = tokio::time::sleep(self.config.canary_interval) => {
                            if let Err(e) = self.canary(&mut step_id).await {
                                self.fail(running, e.context("canary step failed"));
                                return;
                            }
                        }
                    }
                }
                continue;
            }

            let fork = Self::fork_ready(&mut running, &self.metrics);
            let plan = planner.plan(&running);
            let allowed = self.constrain(&mut running, &plan);
            let seqs = Self::build_step(&running, &plan, allowed);
            self.metrics.prefill_tokens.inc_by(
                plan.iter()
                    .map(|p| match p.work {
                        Work::Prefill { len, .. } => len as u64,
                        Work::Decode => 0,
                    })
                    .sum(),
            );
            self.metrics.batch_size.observe(seqs.len() as f64);
            self.metrics
                .step_tokens
                .observe(seqs.iter().map(|s| s.tokens.len()).sum::<usize>() as f64);
            let req = pb::StepRequest {
                step_id,
                seqs,
                release: std::mem::take(&mut release),
                fork,
                ..Default::default()
            };
            step_id += 1;
            let resp = match self.timed_step(req, None).await {
                Ok(r) => r,
                Err(e) => {
                    self.fail(running, e);
                    return;
                }
            };
            let results: HashMap<u64, pb::SeqResult> = resp.results.into_iter().map(|r| (r.seq_id, r)).collect();
            for p in &plan {
                let r = &mut running[p.index];
                if let Work::Prefill { len, .. } = p.work {
                    r.fed += len;
                }
                if r.failed {
                    release.push(r.seq);
                } else if let Some(res) = results.get(&r.seq) {
                    if let Some(token) = res.token {
                        if self.on_token(r, token, res) {
                            release.push(r.seq);
                        }
                    }
                }
            }
            running.retain(|r| !release.contains(&r.seq));
            if !draining {
                self.set_load(&running);
            }
            if !release.is_empty() {
                // Freed capacity: let other replicas' batchers look at the queue again.
                self.queue.wake();
            }
        }
    }

    /// A step bounded in time: a rank that stalls fails the replica instead of
    /// holding its clients. The step is abandoned at once when membership says the
    /// replica left or its session on a shard ends; otherwise it may run for
    /// `limit`, or (when `None`) as long as the replica's recent pace allows.
    async fn timed_step(&mut self, req: pb::StepRequest, limit: Option<Duration>) -> anyhow::Result<pb::StepResponse> {
        let tokens: usize = req.seqs.iter().map(|s| s.tokens.len()).sum();
        let limit = limit.unwrap_or_else(|| self.deadline.deadline(tokens));
        let started = std::time::Instant::now();
        let mut control = self.control.clone();
        let mut step = self.replica.step(req);
        let interrupted = tokio::select! {
            r = &mut step => {
                if r.is_ok() {
                    self.deadline.observe(tokens, started.elapsed());
                    tracing::trace!(replica = self.replica.id, tokens, ms = started.elapsed().as_millis() as u64, "step");
                    self.readiness.ok(self.replica.id);
                    self.board.stepped(self.replica.id, started.elapsed(), self.replica.rank_kv());
                }
                return r;
            }
            _ = tokio::time::sleep(limit) => anyhow::anyhow!(
                "a step of {tokens} tokens took longer than {limit:.1?} (a rank or its collective stalled)"
            ),
            _ = control.wait_for(|c| *c == Control::Gone) => anyhow::anyhow!(
                "it left the cluster membership during a step"
            ),
            _ = self.replica.session_lost() => anyhow::anyhow!("its session on a shard ended during a step"),
        };
        self.abandoned = Some(step);
        Err(interrupted)
    }

    /// One token through every rank and collective of the idle replica, then freed.
    async fn canary(&mut self, step_id: &mut u64) -> anyhow::Result<()> {
        let token = self
            .model
            .eos_ids
            .first()
            .copied()
            .unwrap_or(0)
            .min(self.model.vocab_size as u32 - 1);
        let run = pb::StepRequest {
            step_id: *step_id,
            seqs: vec![pb::SeqStep {
                seq_id: CANARY_SEQ,
                tokens: vec![token],
                ..Default::default()
            }],
            release: vec![CANARY_SEQ],
            ..Default::default()
        };
        let free = pb::StepRequest {
            step_id: *step_id + 1,
            seqs: Vec::new(),
            release: vec![CANARY_SEQ],
            ..Default::default()
        };
        *step_id += 2;
        let limit = Some(self.config.canary_timeout);
        self.timed_step(run, limit).await?;
        self.timed_step(free, limit).await?;
        Ok(())
    }

    /// Starts the newly admitted sequences that use the prefix cache at the prefix
    /// their replica holds, in a step of its own (no forward pass), so that the very
    /// next step prefills only the rest. Every rank must find the same prefix.
    ///
    /// A sequence whose input shares whole blocks with one still prefilling them
    /// (a burst of requests with a new system prompt) waits until those blocks are
    /// computed and cached, so that the prefix is computed once, not by each.
    async fn attach(
        &mut self,
        running: &mut [Running],
        release: &mut Vec<u64>,
        step_id: &mut u64,
    ) -> anyhow::Result<()> {
        let new = Self::ready_to_attach(running, self.model.kv.block_size.max(1));
        if new.is_empty() {
            return Ok(());
        }
        let req = pb::StepRequest {
            step_id: *step_id,
            release: std::mem::take(release),
            attach: new
                .iter()
                .map(|&i| pb::PrefixAttach {
                    seq_id: running[i].seq,
                    tokens: running[i].input.clone(),
                })
                .collect(),
            ..Default::default()
        };
        *step_id += 1;
        let resp = self.timed_step(req, None).await?;
        let found: HashMap<u64, usize> = resp
            .attached
            .iter()
            .map(|a| (a.seq_id, a.cached_tokens as usize))
            .collect();
        for i in new {
            let r = &mut running[i];
            let cached = *found
                .get(&r.seq)
                .ok_or_else(|| anyhow::anyhow!("the shards did not answer for sequence {}", r.seq))?;
            if cached >= r.input.len() {
                anyhow::bail!("the shards found {cached} of {} tokens cached", r.input.len());
            }
            r.attach = false;
            r.cached = cached;
            r.from = cached;
            r.fed = cached;
            self.metrics.prefix_cache_queried_tokens.inc_by(r.input.len() as u64);
            self.metrics.prefix_cache_hit_tokens.inc_by(cached as u64);
            tracing::debug!(request_id = %r.entry.req.id, seq = r.seq, cached, input = r.input.len(), "prefix cache looked up");
        }
        Ok(())
    }

    /// The forks this step starts: each sample waiting for a sibling that has now
    /// read all its prompt but the last token starts as a copy of it (sharing its
    /// KV blocks), to read that last token itself and sample. A sample whose
    /// sibling left (cancelled, preempted, failed) reads its prompt alone. Then
    /// every sibling with samples still to fork holds before its last token.
    fn fork_ready(running: &mut [Running], metrics: &RouterMetrics) -> Vec<pb::Fork> {
        // Every step: nothing to look at unless samples wait or a sibling holds.
        if running.iter().all(|r| r.fork_from.is_none() && !r.holds) {
            return Vec::new();
        }
        let at: HashMap<u64, usize> = running.iter().enumerate().map(|(i, r)| (r.seq, i)).collect();
        let mut forks = Vec::new();
        for i in 0..running.len() {
            let Some(parent) = running[i].fork_from else {
                continue;
            };
            let point = running[i].input.len() - 1;
            let sibling = at.get(&parent).map(|&j| &running[j]).filter(|p| !p.failed);
            match sibling.map(|p| (p.fed, p.cached)) {
                Some((fed, _)) if fed < point => continue,
                Some((fed, cached)) if fed == point => {
                    let r = &mut running[i];
                    forks.push(pb::Fork { parent, child: r.seq });
                    r.fed = point;
                    r.from = point;
                    r.cached = cached;
                    metrics.forked_samples.inc();
                    metrics.forked_prompt_tokens.inc_by(point as u64);
                    tracing::debug!(request_id = %r.entry.req.id, seq = r.seq, parent, shared = point, "sample forked from a sibling's prompt");
                }
                _ => {
                    tracing::debug!(request_id = %running[i].entry.req.id, seq = running[i].seq, "sample's sibling left before the fork; it reads its prompt alone");
                }
            }
            running[i].fork_from = None;
        }
        let pending: std::collections::HashSet<u64> = running.iter().filter_map(|r| r.fork_from).collect();
        for r in running.iter_mut() {
            r.holds = pending.contains(&r.seq);
        }
        forks
    }

    /// Puts what this replica carries on the board requests are routed by.
    fn set_load(&self, running: &[Running]) {
        let room = self.planner().has_batch_room(running.len());
        self.loads
            .set(self.replica.id, Self::kv_in_use(running), running.len(), room);
    }

    /// The sequences to attach now: those waiting to, unless their input shares
    /// more whole blocks with one that has yet to compute them (attached and still
    /// reading its input, or attaching now) than the attached ones have computed.
    fn ready_to_attach(running: &[Running], block: usize) -> Vec<usize> {
        let shared = |i: usize, j: usize| common_prefix(&running[i].input, &running[j].input) / block * block;
        let mut ready: Vec<usize> = Vec::new();
        for i in 0..running.len() {
            if !running[i].attach {
                continue;
            }
            let attached = || (0..running.len()).filter(|&j| j != i && !running[j].attach);
            let computed = attached().map(|j| shared(i, j).min(running[j].fed)).max().unwrap_or(0);
            let waits = attached()
                .filter(|&j| !running[j].prefilled())
                .chain(ready.iter().copied())
                .any(|j| shared(i, j) >= block && shared(i, j) > computed.max(running[j].fed));
            if !waits {
                ready.push(i);
            }
        }
        ready
    }

    fn kv_in_use(running: &[Running]) -> usize {
        running.iter().map(|r| r.kv_slots).sum()
    }

    /// The routing index of this replica's likely cached prefixes: its KV blocks,
    /// twice over (cached blocks outlive the sequences that made them).
    fn index_size(&self) -> IndexSize {
        let kv = &self.model.kv;
        IndexSize {
            block_size: kv.block_size,
            capacity_blocks: 2 * kv.capacity_tokens / kv.block_size.max(1),
        }
    }

    /// The planner for this replica: the configured limits and the shards' KV pool.
    fn planner(&self) -> Planner {
        Planner::new(self.config.schedule, Some(self.model.kv))
    }

    /// Admits from the queue ([`Batcher::admit_fitting`]); when the head waits for
    /// room that less urgent running requests hold, and this replica is the one to
    /// take it, those are preempted ([`Batcher::preempt_for_head`]) and it is
    /// admitted in their place.
    fn admit(&self, planner: &Planner, running: &mut Vec<Running>, next_seq: &mut u64, release: &mut Vec<u64>) {
        loop {
            self.admit_fitting(planner, running, next_seq);
            if !self.preempt_for_head(planner, running, release) {
                return;
            }
        }
    }

    /// Preempts the running requests the planner picks to make batch and KV room
    /// for the queue's head, if it is more urgent than they are and the router
    /// would send it here: their KV is released with the next step and they go back
    /// to the queue with what they have streamed, to resume exactly (as after a
    /// failover) when room frees. Whether any was preempted.
    fn preempt_for_head(&self, planner: &Planner, running: &mut Vec<Running>, release: &mut Vec<u64>) -> bool {
        let cfg = &self.config;
        let now = std::time::Instant::now();
        let head = self.queue.peek(|e| {
            let takes = self.loads.takes(
                self.replica.id,
                &e.req.prompt_ids,
                cfg.prefix_cache && e.req.prefix_cache,
                cfg.route_imbalance,
            );
            (
                takes,
                effective_priority(e, now),
                e.req.prompt_ids.len() + e.req.max_new_tokens,
            )
        });
        let Some((true, urgency, len)) = head else {
            return false;
        };
        let holders: Vec<Holder> = running
            .iter()
            .map(|r| Holder {
                urgency: effective_priority(&r.entry, now),
                kv_slots: r.kv_slots,
            })
            .collect();
        let Some(mut victims) = planner.preemption(&holders, urgency, len) else {
            return false;
        };
        victims.sort_unstable_by(|a, b| b.cmp(a));
        for i in victims {
            let r = running.remove(i);
            tracing::info!(
                request_id = %r.entry.req.id,
                priority = r.entry.req.priority,
                streamed = r.entry.progress.generated.len(),
                for_priority = urgency,
                "request preempted for a more urgent one; it resumes when room frees"
            );
            release.push(r.seq);
            self.metrics.running_sequences.dec();
            self.metrics.preempted_requests.inc();
            self.queue.ended(self.replica.id, 1);
            self.queue.push_front(r.entry);
        }
        self.set_load(running);
        true
    }

    /// Takes requests from the queue while the planner admits them and this replica
    /// is the least loaded; the queue's head waits for room rather than being
    /// overtaken, so a large request does not starve. A sample of a request of
    /// several comes with its siblings that fit too, to fork its prompt.
    fn admit_fitting(&self, planner: &Planner, running: &mut Vec<Running>, next_seq: &mut u64) {
        self.set_load(running);
        let cfg = &self.config;
        let uses_cache = |e: &Entry| cfg.prefix_cache && e.req.prefix_cache;
        let len = |e: &Entry| e.req.prompt_ids.len() + e.req.max_new_tokens;
        while planner.has_batch_room(running.len()) {
            let in_use = Self::kv_in_use(running);
            let Some(entry) = self.queue.pop_if(|e| {
                planner.kv_fits(in_use, len(e))
                    && self
                        .loads
                        .takes(self.replica.id, &e.req.prompt_ids, uses_cache(e), cfg.route_imbalance)
            }) else {
                break;
            };
            let kv_slots = planner.kv_slots(len(&entry));
            // Samples fork from a prompt read but for its last token: one of a
            // single token has nothing to share.
            let group = entry
                .req
                .sample
                .filter(|_| entry.progress.generated.is_empty() && entry.req.prompt_ids.len() > 1)
                .map(|s| s.group);
            let (leader, sample_len) = (*next_seq, len(&entry));
            running.push(self.start(entry, next_seq, kv_slots));
            if let Some(group) = group {
                // Siblings are alike: each reserves what this one does.
                let (count, in_use) = (running.len(), Self::kv_in_use(running));
                let siblings = self.queue.take_siblings(group, |_, k| {
                    planner.has_batch_room(count + k) && planner.kv_fits(in_use + k * kv_slots, sample_len)
                });
                if !siblings.is_empty() {
                    running[count - 1].holds = true;
                }
                for e in siblings {
                    let mut r = self.start(e, next_seq, kv_slots);
                    r.attach = false;
                    r.fork_from = Some(leader);
                    running.push(r);
                }
            }
            self.set_load(running);
        }
    }

    /// A request taken from the queue, as it starts running here as sequence
    /// `next_seq` (which moves on), reserving `kv_slots`.
    fn start(&self, mut entry: Entry, next_seq: &mut u64, kv_slots: usize) -> Running {
        tracing::debug!(
            request_id = %entry.req.id,
            replica = self.replica.id,
            queued_ms = entry.enqueued.elapsed().as_millis() as u64,
            resumed_at = entry.progress.generated.len(),
            sample = entry.req.sample.map(|s| s.index),
            "request admitted"
        );
        if !entry.progress.admitted {
            entry.progress.admitted = true;
            let m = &self.metrics;
            m.queue_time.observe(entry.enqueued.elapsed().as_secs_f64());
            m.prompt_tokens.inc_by(entry.req.prompt_ids.len() as u64);
            m.request_prompt_tokens.observe(entry.req.prompt_ids.len() as f64);
            if let Some(c) = &entry.req.constraint {
                m.structured_requests.with_label_values(&[c.kind().as_str()]).inc();
                m.structured_compile.observe(c.compile_secs());
                entry.progress.follower = Some(c.follow());
            }
        }
        self.metrics.running_sequences.inc();
        self.queue.started(self.replica.id);
        self.metrics.queue_depth.set(self.queue.len() as i64);
        if entry.progress.decoder.is_none() {
            entry.progress.decoder = self
                .tokenizer
                .as_ref()
                .map(|t| StreamDecoder::new(t, &entry.req.prompt_ids));
        }
        let replayed = entry.progress.generated.len();
        let mut input = entry.req.prompt_ids.clone();
        input.extend_from_slice(&entry.progress.generated);
        let attach = self.config.prefix_cache && entry.req.prefix_cache;
        if attach {
            self.loads.remember(self.replica.id, &input, self.index_size());
        }
        let seq = *next_seq;
        *next_seq += 1;
        Running {
            entry,
            seq,
            input,
            replayed,
            fed: 0,
            kv_slots,
            attach,
            cached: 0,
            from: 0,
            failed: false,
            fork_from: None,
            holds: false,
        }
    }

    /// The shard requests for `plan`: a decode feeds the last sampled token; a
    /// prefill chunk carries the sampling parameters and request id with its first
    /// chunk, and samples (with the asked logprobs) with its last.
    fn build_step(running: &[Running], plan: &[Planned], allowed: Vec<Option<Vec<u32>>>) -> Vec<pb::SeqStep> {
        plan.iter()
            .zip(allowed)
            .map(|(p, allowed)| {
                let r = &running[p.index];
                let allowed_tokens = allowed.unwrap_or_default();
                match p.work {
                    Work::Decode => pb::SeqStep {
                        seq_id: r.seq,
                        tokens: vec![*r
                            .entry
                            .progress
                            .generated
                            .last()
                            .expect("a decoding sequence has sampled")],
                        sample: true,
                        params: None,
                        replayed: 0,
                        return_logits: false,
                        top_logprobs: r.entry.req.top_logprobs as u32,
                        request_id: String::new(),
                        allowed_tokens,
                    },
                    Work::Prefill { start, len, last } => pb::SeqStep {
                        seq_id: r.seq,
                        tokens: r.input[start..start + len].to_vec(),
                        sample: last,
                        params: (start == r.from).then(|| (&r.entry.req.params).into()),
                        replayed: r.replayed as u32,
                        return_logits: false,
                        top_logprobs: if last { r.entry.req.top_logprobs as u32 } else { 0 },
                        request_id: if start == r.from {
                            r.entry.req.id.clone()
                        } else {
                            String::new()
                        },
                        allowed_tokens,
                    },
                }
            })
            .collect()
    }

    /// The allowed tokens of each planned sequence that samples under a constraint
    /// (`None` for the others), in plan order. A sequence whose grammar fails ends
    /// with an error and is marked `failed`.
    fn constrain(&self, running: &mut [Running], plan: &[Planned]) -> Vec<Option<Vec<u32>>> {
        if running.iter().all(|r| r.entry.progress.follower.is_none()) {
            return vec![None; plan.len()];
        }
        let samples: HashMap<usize, usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.work, Work::Decode | Work::Prefill { last: true, .. }))
            .map(|(at, p)| (p.index, at))
            .collect();
        let mut out = vec![None; plan.len()];
        let mut at = Vec::new();
        let mut followers = Vec::new();
        for (index, r) in running.iter_mut().enumerate() {
            if let (Some(&pos), Some(f)) = (samples.get(&index), r.entry.progress.follower.as_mut()) {
                at.push((pos, index));
                followers.push(f);
            }
        }
        if followers.is_empty() {
            return out;
        }
        let started = std::time::Instant::now();
        let masks = crate::structured::allowed_all(&mut followers);
        self.metrics.structured_mask.observe(started.elapsed().as_secs_f64());
        for ((pos, index), mask) in at.into_iter().zip(masks) {
            match mask {
                Ok(m) => out[pos] = Some(m),
                Err(e) => self.end_with_error(&mut running[index], &format!("structured output: {e}")),
            }
        }
        out
    }

    /// Ends a sequence with an error its client hears.
    fn end_with_error(&self, r: &mut Running, message: &str) {
        tracing::warn!(request_id = %r.entry.req.id, error = message, "request failed");
        let _ = r.entry.tx.send(Err(Status::internal(message.to_string())));
        r.failed = true;
        self.metrics.request_ended("internal", "none");
        self.metrics.running_sequences.dec();
        self.queue.ended(self.replica.id, 1);
    }

    /// Handles a sampled token; returns true when the sequence is finished.
    fn on_token(&self, r: &mut Running, token: u32, res: &pb::SeqResult) -> bool {
        let p = &mut r.entry.progress;
        let complete = match p.follower.as_mut().map(|f| f.commit(token).map(|()| f.is_finished())) {
            None => false,
            Some(Ok(done)) => done,
            Some(Err(e)) => {
                // The shard sampled outside the allowed set: never for a mask it
                // applied, so a bug; the client hears it rather than getting output
                // that breaks its constraint.
                self.end_with_error(
                    r,
                    &format!("structured output: token {token} broke the constraint: {e}"),
                );
                return true;
            }
        };
        p.generated.push(token);
        let req = &r.entry.req;
        let delta = match p.decoder.as_mut() {
            Some(d) => d.push(token).unwrap_or_default(),
            None => String::new(),
        };
        let stop = StopCriteria {
            max_new_tokens: req.max_new_tokens,
            eos_ids: &self.model.eos_ids,
            ignore_eos: req.ignore_eos,
            stop_token_ids: &req.stop_token_ids,
            stop_sequences: &req.stop_sequences,
            complete,
        };
        let decoder = &mut p.decoder;
        let judged = stop.judge(token, p.generated.len(), &delta, &mut p.pending, || {
            decoder
                .as_mut()
                .map(|d| d.finish().unwrap_or_default())
                .unwrap_or_default()
        });
        let emit = judged.text;
        let finish = judged.finish.map(|(reason, matched)| {
            let stop = match matched {
                StopMatch::None => String::new(),
                StopMatch::Token(id) => self
                    .tokenizer
                    .as_ref()
                    .and_then(|t| t.id_to_piece(id))
                    .unwrap_or_default(),
                StopMatch::Sequence(s) => s,
            };
            (reason, stop)
        });
        let logprob = req.logprobs.then_some(res.logprob);
        let top = res.top_logprobs.iter().map(|t| (t.id, t.logprob)).collect();
        let delivered = r.send(Event::Token {
            id: token,
            text: emit,
            logprob,
            top_logprobs: top,
        });
        if !delivered {
            self.metrics.request_ended("cancelled", "cancelled");
            self.metrics.running_sequences.dec();
            self.queue.ended(self.replica.id, 1);
            return true;
        }
        let now = std::time::Instant::now();
        self.metrics.generated_tokens.inc();
        match r.entry.progress.last_token_at.replace(now) {
            None => {
                let ttft = now - r.entry.enqueued;
                tracing::debug!(request_id = %r.entry.req.id, ttft_ms = ttft.as_millis() as u64, cached = r.cached, "first token");
                self.metrics.time_to_first_token.observe(ttft.as_secs_f64())
            }
            Some(prev) => self.metrics.inter_token_latency.observe((now - prev).as_secs_f64()),
        }
        match finish {
            Some((reason, stop)) => {
                r.finish(reason, stop, &self.metrics);
                self.metrics.running_sequences.dec();
                self.queue.ended(self.replica.id, 1);
                true
            }
            None => false,
        }
    }

    /// Leaves the rotation after draining.
    fn leave(&self) {
        self.board.left(self.replica.id);
        self.loads.remove(self.replica.id);
        self.readiness.remove(self.replica.id);
        self.live_replicas.fetch_sub(1, Ordering::SeqCst);
    }

    /// The replica failed: it leaves the rotation, and its requests go back to the
    /// head of the queue (in their order) to resume on another replica. If none is
    /// left by the failover timeout, the waiting requests end with UNAVAILABLE.
    fn fail(&self, running: Vec<Running>, err: anyhow::Error) {
        self.loads.remove(self.replica.id);
        self.readiness.remove(self.replica.id);
        self.metrics.replica_failures.inc();
        self.metrics.running_sequences.sub(running.len() as i64);
        self.queue.ended(self.replica.id, running.len());
        let msg = format!("replica {} failed: {err:#}", self.replica.id);
        self.board.failed(self.replica.id, format!("{err:#}"));
        tracing::error!(replica = self.replica.id, error = %format!("{err:#}"), in_flight = running.len(), "replica failed; taking it out of rotation");
        for r in running.into_iter().rev() {
            if r.entry.tx.is_closed() {
                continue;
            }
            let mut entry = r.entry;
            entry.progress.failovers += 1;
            self.metrics.readmitted_requests.inc();
            tracing::warn!(request_id = %entry.req.id, streamed = entry.progress.generated.len(), "request re-queued after replica failure");
            self.queue.push_front(entry);
        }
        if self.live_replicas.fetch_sub(1, Ordering::SeqCst) == 1 {
            let queue = self.queue.clone();
            let live = self.live_replicas.clone();
            let timeout = self.config.failover_timeout;
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                if live.load(Ordering::SeqCst) == 0 {
                    for e in queue.drain() {
                        metrics.request_ended("unavailable", "none");
                        let _ = e.tx.send(Err(Status::unavailable(format!(
                            "{msg}; no replica took over within {timeout:?}"
                        ))));
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Progress;
    use crate::validation::ValidRequest;
    use std::time::Instant;

    /// A running request whose replica failed after it had generated `generated`.
    fn running(seq: u64, prompt: &[u32], generated: &[u32], top_logprobs: usize) -> Running {
        let (tx, _rx) = crate::request::EventSender::channel();
        let req = ValidRequest {
            id: format!("req-{seq}"),
            prompt_ids: prompt.to_vec(),
            params: Default::default(),
            max_new_tokens: 8,
            stop_sequences: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            top_logprobs,
            prefix_cache: true,
            constraint: None,
            priority: 0,
            deadline: None,
            num_samples: 1,
            sample: None,
        };
        Running {
            entry: Entry {
                req,
                tx,
                enqueued: Instant::now(),
                progress: Progress {
                    generated: generated.to_vec(),
                    ..Default::default()
                },
            },
            seq,
            input: [prompt, generated].concat(),
            replayed: generated.len(),
            fed: 0,
            kv_slots: 0,
            attach: false,
            cached: 0,
            from: 0,
            failed: false,
            fork_from: None,
            holds: false,
        }
    }

    #[test]
    fn a_burst_with_a_new_prefix_computes_it_once() {
        let prefix: Vec<u32> = (10..30).collect();
        let with = |tail: &[u32]| [&prefix[..], tail].concat();
        let mut batch: Vec<Running> = (0..4)
            .map(|i| {
                let mut r = running(i, &with(&[i as u32]), &[], 0);
                r.attach = true;
                r
            })
            .collect();
        batch.push(running(9, &[1, 2, 3], &[], 0));
        batch[4].attach = true;
        // The first with the prefix leads; the others wait; an unrelated one goes.
        assert_eq!(Batcher::ready_to_attach(&batch, 8), vec![0, 4]);
        batch[0].attach = false;
        batch[4].attach = false;
        batch[0].fed = 8;
        assert!(
            Batcher::ready_to_attach(&batch, 8).is_empty(),
            "16 shared tokens, 8 computed"
        );
        batch[0].fed = 16;
        assert_eq!(Batcher::ready_to_attach(&batch, 8), vec![1, 2, 3]);
        // Sharing less than a block is no reason to wait.
        assert_eq!(Batcher::ready_to_attach(&batch, 32), vec![1, 2, 3]);
    }

    #[test]
    fn samples_fork_from_a_sibling_that_read_all_but_the_last_token() {
        let metrics = RouterMetrics::new();
        let planner = Planner::new(SchedulerConfig::default(), None);
        let prompt: Vec<u32> = (1..=9).collect();
        let mut batch = vec![
            running(1, &prompt, &[], 0),
            running(2, &prompt, &[], 0),
            running(3, &prompt, &[], 0),
        ];
        batch[0].holds = true;
        batch[1].fork_from = Some(1);
        batch[2].fork_from = Some(1);
        // The sibling reads all but the last token and samples nothing; the samples wait.
        assert!(Batcher::fork_ready(&mut batch, &metrics).is_empty());
        let plan = planner.plan(&batch);
        assert_eq!(plan.len(), 1);
        assert_eq!(
            plan[0].work,
            Work::Prefill {
                start: 0,
                len: 8,
                last: false
            }
        );
        batch[0].fed = 8;
        let forks = Batcher::fork_ready(&mut batch, &metrics);
        assert_eq!(
            forks.iter().map(|f| (f.parent, f.child)).collect::<Vec<_>>(),
            vec![(1, 2), (1, 3)]
        );
        assert!(!batch[0].holds);
        // Then each reads the last token itself and samples; the forks' first
        // chunk carries their own parameters (the sibling's went with its first).
        let plan = planner.plan(&batch);
        let steps = Batcher::build_step(&batch, &plan, vec![None; plan.len()]);
        assert_eq!(steps.len(), 3);
        for (i, s) in steps.iter().enumerate() {
            assert_eq!(s.tokens, [9]);
            assert!(s.sample);
            assert_eq!(s.params.is_some(), i > 0);
        }
        assert_eq!(metrics.forked_prompt_tokens.get(), 16);
        // A sample whose sibling left reads its prompt alone.
        let mut orphan = vec![running(4, &prompt, &[], 0)];
        orphan[0].fork_from = Some(1);
        assert!(Batcher::fork_ready(&mut orphan, &metrics).is_empty());
        assert_eq!((orphan[0].fork_from, orphan[0].fed), (None, 0));
        assert_eq!(
            planner.plan(&orphan)[0].work,
            Work::Prefill {
                start: 0,
                len: 9,
                last: true
            }
        );
    }

    #[test]
    fn chunks_carry_params_and_id_first_and_sample_last_while_others_decode() {
        let config = SchedulerConfig {
            max_batch_size: 8,
            prefill_chunk: 3,
            prefill_budget: 4,
        };
        let planner = Planner::new(config, None);
        let mut decoding = running(1, &[5, 6], &[9], 0);
        decoding.fed = decoding.input.len();
        let mut batch = vec![decoding, running(2, &[1, 2, 3, 4], &[7], 2)];

        let plan = planner.plan(&batch);
        let steps = Batcher::build_step(&batch, &plan, vec![None; plan.len()]);
        assert_eq!(steps.len(), 2);
        let (decode, first) = (&steps[0], &steps[1]);
        assert_eq!((decode.seq_id, decode.tokens.as_slice()), (1, &[9][..]));
        assert!(decode.sample && decode.params.is_none() && decode.request_id.is_empty());
        assert_eq!(first.tokens, [1, 2, 3], "one chunk");
        assert!(!first.sample && first.params.is_some());
        assert_eq!(
            (first.request_id.as_str(), first.replayed, first.top_logprobs),
            ("req-2", 1, 0)
        );

        batch[1].fed += 3;
        let plan = planner.plan(&batch);
        let last = &Batcher::build_step(&batch, &plan, vec![None; plan.len()])[1];
        // The replayed token ends the input: this chunk samples, with the logprobs asked.
        assert_eq!(last.tokens, [4, 7]);
        assert!(last.sample && last.params.is_none() && last.request_id.is_empty());
        assert_eq!((last.replayed, last.top_logprobs), (1, 2));
    }
}
