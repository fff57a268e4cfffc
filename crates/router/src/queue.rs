//! The bounded queue of validated requests waiting for a replica. Requests that a
//! replica's free batch slot will take at once are always let in; beyond those, at
//! most `max` wait, and past that a request is refused at once (RESOURCE_EXHAUSTED),
//! not left to time out. Requests leave in priority order (lower first), then in
//! the order they arrived; each [`AGE`] a request has waited counts as one level
//! more urgent, so that a steady stream of urgent requests cannot starve the rest.

use crate::load::LoadBoard;
use crate::request::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long a request waits to gain one priority level.
pub(crate) const AGE: Duration = Duration::from_secs(10);

/// A request's priority now: its own, less one level per [`AGE`] since it was
/// queued (lower runs first).
pub(crate) fn effective_priority(e: &Entry, now: Instant) -> i64 {
    let aged = now.saturating_duration_since(e.enqueued).as_secs() / AGE.as_secs();
    i64::from(e.req.priority) - aged as i64
}

pub(crate) struct Queue {
    state: Mutex<State>,
    max: usize,
    /// Sequences one replica's batch holds.
    batch_slots: usize,
    /// The replicas taking new requests (serving and not draining).
    serving: Arc<LoadBoard>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    entries: VecDeque<Entry>,
    /// Taken by a batcher that has not yet counted them as running on its replica;
    /// counted here meanwhile, so that a request is never in neither place.
    taken: usize,
    /// Sequences running on each replica.
    running: HashMap<usize, usize>,
}

impl State {
    fn free_slots(&self, batch_slots: usize, serving: &LoadBoard) -> usize {
        serving
            .replicas()
            .iter()
            .map(|r| batch_slots.saturating_sub(self.running.get(r).copied().unwrap_or(0)))
            .sum::<usize>()
            .saturating_sub(self.taken)
    }
}

impl Queue {
    pub(crate) fn new(max: usize, batch_slots: usize, serving: Arc<LoadBoard>) -> Self {
        Queue {
            state: Mutex::new(State::default()),
            max,
            batch_slots,
            serving,
            notify: Notify::new(),
        }
    }

    /// Appends `entries` (a request's samples), or none of them when more than
    /// `max` requests would wait beyond what the serving replicas' free batch slots
    /// take now.
    pub(crate) fn push_all(&self, entries: Vec<Entry>) -> Result<(), ()> {
        {
            let mut s = self.state.lock().unwrap();
            s.entries.retain(|e| !e.tx.is_closed());
            let room = self.max + s.free_slots(self.batch_slots, &self.serving);
            if s.entries.len() + entries.len() > room {
                return Err(());
            }
            s.entries.extend(entries);
        }
        self.notify.notify_waiters();
        Ok(())
    }

    /// Puts `e` back at the head (a request whose replica failed before it started).
    pub(crate) fn push_front(&self, e: Entry) {
        self.state.lock().unwrap().entries.push_front(e);
        self.notify.notify_waiters();
    }

    /// The request that leaves next: the lowest effective priority, the earliest
    /// queued among equals (requests whose client left are dropped first).
    fn head(s: &mut State) -> Option<usize> {
        s.entries.retain(|e| !e.tx.is_closed());
        let now = Instant::now();
        s.entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| (effective_priority(e, now), e.enqueued))
            .map(|(i, _)| i)
    }

    /// Takes the head if `fits` accepts it (a head that does not fit is not
    /// overtaken). The taker must then call [`Queue::started`].
    pub(crate) fn pop_if(&self, fits: impl Fn(&Entry) -> bool) -> Option<Entry> {
        let mut s = self.state.lock().unwrap();
        let i = Self::head(&mut s)?;
        if fits(&s.entries[i]) {
            s.taken += 1;
            s.entries.remove(i)
        } else {
            None
        }
    }

    /// Takes the queued samples of `group` that have not started (in queue order)
    /// while `fits` accepts them, given how many were taken before: the siblings of
    /// a sample a batcher just took, to fork its prompt. The taker must call
    /// [`Queue::started`] for each.
    pub(crate) fn take_siblings(&self, group: u64, fits: impl Fn(&Entry, usize) -> bool) -> Vec<Entry> {
        let mut s = self.state.lock().unwrap();
        let mut taken = Vec::new();
        let mut i = 0;
        while i < s.entries.len() {
            let e = &s.entries[i];
            let sibling = e.req.sample.is_some_and(|x| x.group == group) && e.progress.generated.is_empty();
            if sibling && !e.tx.is_closed() {
                if !fits(e, taken.len()) {
                    break;
                }
                taken.extend(s.entries.remove(i));
            } else {
                i += 1;
            }
        }
        s.taken += taken.len();
        taken
    }

    /// `f` of the head, left in place: what a batcher deciding whether to preempt
    /// for it reads.
    pub(crate) fn peek<T>(&self, f: impl FnOnce(&Entry) -> T) -> Option<T> {
        let mut s = self.state.lock().unwrap();
        let i = Self::head(&mut s)?;
        Some(f(&s.entries[i]))
    }

    /// A request taken from the queue runs on `replica`.
    pub(crate) fn started(&self, replica: usize) {
        let mut s = self.state.lock().unwrap();
        s.taken = s.taken.saturating_sub(1);
        *s.running.entry(replica).or_default() += 1;
    }

    /// `n` sequences on `replica` finished, were cancelled, or lost their replica.
    pub(crate) fn ended(&self, replica: usize, n: usize) {
        let mut s = self.state.lock().unwrap();
        if let Some(r) = s.running.get_mut(&replica) {
            *r = r.saturating_sub(n);
            if *r == 0 {
                s.running.remove(&replica);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.state.lock().unwrap().entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns everything queued.
    pub(crate) fn drain(&self) -> Vec<Entry> {
        self.state.lock().unwrap().entries.drain(..).collect()
    }

    /// Removes and returns the requests that have waited longer than `max_wait` since
    /// they were queued. Requests re-queued after their replica failed are left: the
    /// failover timeout bounds those.
    pub(crate) fn expire(&self, max_wait: Duration) -> Vec<Entry> {
        self.take_where(|e| !e.progress.admitted && e.enqueued.elapsed() > max_wait)
    }

    /// Removes and returns the requests whose deadline has passed.
    pub(crate) fn expire_deadlines(&self, now: Instant) -> Vec<Entry> {
        self.take_where(|e| e.req.deadline.is_some_and(|d| d <= now))
    }

    /// Removes and returns the requests `pred` picks, keeping the others' order.
    fn take_where(&self, pred: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        let mut s = self.state.lock().unwrap();
        // Checked every tick: the queue is rebuilt only when something is taken.
        if !s.entries.iter().any(&pred) {
            return Vec::new();
        }
        let (taken, kept): (VecDeque<Entry>, VecDeque<Entry>) =
            std::mem::take(&mut s.entries).into_iter().partition(pred);
        s.entries = kept;
        taken.into()
    }

    /// Resolves when something is pushed (or [`Queue::wake`] is called) after the
    /// returned future was created and polled or enabled.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    pub(crate) fn wake(&self) {
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{EventReceiver, Progress};
    use crate::validation::ValidRequest;
    use std::time::Instant;

    fn entry() -> (Entry, EventReceiver) {
        entry_named("r")
    }

    fn entry_named(id: &str) -> (Entry, EventReceiver) {
        let (tx, rx) = crate::request::EventSender::channel();
        let req = ValidRequest {
            id: id.into(),
            prompt_ids: vec![1],
            params: Default::default(),
            max_new_tokens: 1,
            stop_sequences: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            top_logprobs: 0,
            prefix_cache: true,
            constraint: None,
            priority: 0,
            deadline: None,
            num_samples: 1,
            sample: None,
        };
        let e = Entry {
            req,
            tx,
            enqueued: Instant::now(),
            progress: Progress::default(),
        };
        (e, rx)
    }

    #[test]
    fn the_bound_counts_only_requests_no_free_slot_takes() {
        let serving = Arc::new(LoadBoard::default());
        serving.set(0, 0, 0, true);
        serving.set(1, 0, 0, true);
        let q = Queue::new(3, 2, serving.clone());
        let mut keep = Vec::new();
        // Two replicas with two slots each: 4 start at once, 3 more wait.
        for i in 0..7 {
            let (e, rx) = entry();
            q.push_all(vec![e]).unwrap_or_else(|_| panic!("request {i} refused"));
            keep.push(rx);
        }
        let (e, _rx) = entry();
        assert!(q.push_all(vec![e]).is_err(), "an eighth request fits nowhere");
        // A batcher takes two onto replica 0: still no room, both in flight and counted.
        for _ in 0..2 {
            q.pop_if(|_| true).unwrap();
            let (e, _rx) = entry();
            assert!(q.push_all(vec![e]).is_err(), "a taken request still holds its slot");
            q.started(0);
        }
        let (e, _rx) = entry();
        assert!(q.push_all(vec![e]).is_err());
        // One ends: one more fits.
        q.ended(0, 1);
        let (e, rx) = entry();
        q.push_all(vec![e])
            .unwrap_or_else(|_| panic!("a freed slot lets one in"));
        keep.push(rx);
        // A draining replica's slots do not count.
        serving.remove(1);
        let (e, _rx) = entry();
        assert!(q.push_all(vec![e]).is_err());
        // Clients that left stop counting.
        keep.clear();
        let (e, _rx) = entry();
        q.push_all(vec![e]).unwrap_or_else(|_| panic!("waiting clients left"));
    }

    #[test]
    fn siblings_are_taken_together_while_they_fit_and_others_stay() {
        let q = Queue::new(10, 1, Arc::new(LoadBoard::default()));
        let sample = |id: &str, group, index| {
            let (mut e, rx) = entry_named(id);
            e.req.sample = Some(crate::validation::SampleOf { group, index });
            (e, rx)
        };
        let (a0, _r0) = sample("a0", 1, 0);
        let (other, _r1) = entry_named("other");
        let (a1, _r2) = sample("a1", 1, 1);
        let (b0, _r3) = sample("b0", 2, 0);
        let (mut a2, _r4) = sample("a2", 1, 2);
        let (a3, _r5) = sample("a3", 1, 3);
        // A sample that has streamed (preempted) cannot fork: it is left.
        a2.progress.generated = vec![7];
        q.push_all(vec![a0, other, a1, b0, a2, a3]).unwrap();
        assert_eq!(q.pop_if(|_| true).unwrap().req.id, "a0");
        let taken = q.take_siblings(1, |_, k| k < 5);
        assert_eq!(
            taken.iter().map(|e| e.req.id.as_str()).collect::<Vec<_>>(),
            ["a1", "a3"]
        );
        let (c, _r6) = sample("c", 3, 0);
        let (d, _r7) = sample("d", 3, 1);
        q.push_all(vec![c, d]).unwrap();
        assert!(q.take_siblings(3, |_, k| k < 1).len() == 1, "only what fits");
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn expiry_takes_only_first_admissions_that_waited_too_long() {
        let q = Queue::new(10, 1, Arc::new(LoadBoard::default()));
        let (mut old, _a) = entry();
        old.enqueued = Instant::now() - Duration::from_secs(5);
        let (mut resumed, _b) = entry();
        resumed.enqueued = Instant::now() - Duration::from_secs(5);
        resumed.progress.admitted = true;
        let (fresh, _c) = entry();
        for e in [old, resumed, fresh] {
            q.push_all(vec![e]).unwrap_or_else(|_| panic!("refused"));
        }
        let expired = q.expire(Duration::from_secs(1));
        assert_eq!(expired.len(), 1);
        assert!(!expired[0].progress.admitted);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn a_request_whose_client_left_is_dropped_not_handed_out() {
        let q = Queue::new(2, 1, Arc::new(LoadBoard::default()));
        let (gone, rx) = entry_named("gone");
        q.push_all(vec![gone]).unwrap_or_else(|_| panic!("refused"));
        let (kept, _rx) = entry_named("kept");
        q.push_all(vec![kept]).unwrap_or_else(|_| panic!("refused"));
        // The client goes away while its request waits at the head.
        drop(rx);
        let taken = q.pop_if(|_| true).expect("the waiting request is handed out");
        assert_eq!(taken.req.id, "kept");
        assert!(q.is_empty(), "the abandoned request is gone too");
        assert!(q.pop_if(|_| true).is_none());
    }

    #[test]
    fn a_request_whose_client_left_does_not_count_against_the_bound() {
        // No replica serves: only `max` (here 1) may wait.
        let q = Queue::new(1, 4, Arc::new(LoadBoard::default()));
        let (gone, rx) = entry_named("gone");
        q.push_all(vec![gone]).unwrap_or_else(|_| panic!("refused"));
        let (e, _rx) = entry();
        assert!(q.push_all(vec![e]).is_err(), "the queue is full");
        drop(rx);
        let (e, _rx) = entry();
        q.push_all(vec![e])
            .unwrap_or_else(|_| panic!("the left client's place is free"));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_full_queue_refuses_until_a_pop_or_an_end_makes_room() {
        // Nothing serving: two may wait, a third is refused until one is taken.
        let q = Queue::new(2, 1, Arc::new(LoadBoard::default()));
        let mut keep = Vec::new();
        for _ in 0..2 {
            let (e, rx) = entry();
            q.push_all(vec![e]).unwrap_or_else(|_| panic!("refused"));
            keep.push(rx);
        }
        let (e, _rx) = entry();
        assert!(q.push_all(vec![e]).is_err(), "full");
        q.pop_if(|_| true).unwrap();
        let (e, rx) = entry();
        q.push_all(vec![e]).unwrap_or_else(|_| panic!("a pop makes room"));
        keep.push(rx);
        // One replica with one batch slot: its running request holds the slot until it ends.
        let serving = Arc::new(LoadBoard::default());
        serving.set(0, 0, 0, true);
        let q = Queue::new(1, 1, serving);
        for _ in 0..2 {
            let (e, rx) = entry();
            q.push_all(vec![e]).unwrap_or_else(|_| panic!("refused"));
            keep.push(rx);
        }
        q.pop_if(|_| true).unwrap();
        q.started(0);
        let (e, _rx) = entry();
        assert!(q.push_all(vec![e]).is_err(), "the slot is taken and one waits");
        q.ended(0, 1);
        let (e, rx) = entry();
        q.push_all(vec![e]).unwrap_or_else(|_| panic!("an end makes room"));
        keep.push(rx);
        assert_eq!(q.len(), 2);
    }

    /// An entry of `priority` queued `ago` ago.
    fn entry_at(id: &str, priority: i32, ago: Duration) -> (Entry, EventReceiver) {
        let (mut e, rx) = entry_named(id);
        e.req.priority = priority;
        e.enqueued = Instant::now() - ago;
        (e, rx)
    }

    #[test]
    fn requests_leave_by_priority_then_arrival_and_waiting_ages_them() {
        let q = Queue::new(10, 1, Arc::new(LoadBoard::default()));
        let mut keep = Vec::new();
        let ms = Duration::from_millis;
        for (id, priority, ago) in [
            ("batch", 10, ms(900)),
            ("late", 0, ms(100)),
            ("early", 0, ms(500)),
            ("urgent", -5, ms(0)),
            // Waited 95 s: nine levels more urgent than its own 10, still behind 0.
            ("aged", 10, Duration::from_secs(95)),
            // Waited 25 s at 2: now 0, and earlier than every other 0.
            ("old", 2, Duration::from_secs(25)),
        ] {
            let (e, rx) = entry_at(id, priority, ago);
            q.push_all(vec![e]).unwrap_or_else(|_| panic!("refused"));
            keep.push(rx);
        }
        let (p, n) = q
            .peek(|e| (effective_priority(e, Instant::now()), e.req.id.clone()))
            .unwrap();
        assert_eq!((p, n.as_str()), (-5, "urgent"));
        let order: Vec<String> = std::iter::from_fn(|| q.pop_if(|_| true).map(|e| e.req.id)).collect();
        assert_eq!(order, ["urgent", "old", "early", "late", "aged", "batch"]);
    }

    #[test]
    fn a_head_that_does_not_fit_is_not_overtaken_by_a_less_urgent_one() {
        let q = Queue::new(10, 1, Arc::new(LoadBoard::default()));
        let (big, _a) = entry_at("big", 0, Duration::ZERO);
        let (small, _b) = entry_at("small", 5, Duration::from_secs(1));
        q.push_all(vec![small]).unwrap_or_else(|_| panic!("refused"));
        q.push_all(vec![big]).unwrap_or_else(|_| panic!("refused"));
        assert!(q.pop_if(|e| e.req.id == "small").is_none());
        assert_eq!(q.pop_if(|_| true).unwrap().req.id, "big");
    }

    #[test]
    fn requests_past_their_deadline_are_taken_out() {
        let q = Queue::new(10, 1, Arc::new(LoadBoard::default()));
        let now = Instant::now();
        let mut keep = Vec::new();
        for (id, deadline) in [
            ("due", Some(now)),
            ("later", Some(now + Duration::from_secs(60))),
            ("none", None),
        ] {
            let (mut e, rx) = entry_named(id);
            e.req.deadline = deadline;
            q.push_all(vec![e]).unwrap_or_else(|_| panic!("refused"));
            keep.push(rx);
        }
        let due = q.expire_deadlines(now);
        assert_eq!(due.iter().map(|e| e.req.id.as_str()).collect::<Vec<_>>(), ["due"]);
        assert_eq!(q.len(), 2);
        assert!(q.expire_deadlines(now).is_empty());
    }

    #[test]
    fn pop_if_leaves_a_head_that_does_not_fit() {
        let q = Queue::new(2, 1, Arc::new(LoadBoard::default()));
        let (e, _rx) = entry();
        q.push_all(vec![e]).unwrap_or_else(|_| panic!("refused"));
        assert!(q.pop_if(|_| false).is_none());
        assert_eq!(q.len(), 1);
    }
}
