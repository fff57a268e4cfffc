//! The bounded queue of validated requests waiting for a replica. Past its bound a
//! request is refused at once (RESOURCE_EXHAUSTED), not left to time out.

use crate::infer::Entry;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

pub struct Queue {
    entries: Mutex<VecDeque<Entry>>,
    max: usize,
    notify: Notify,
}

impl Queue {
    pub fn new(max: usize) -> Self {
        Queue {
            entries: Mutex::new(VecDeque::new()),
            max,
            notify: Notify::new(),
        }
    }

    /// Appends `e`, or gives it back when the queue is full.
    pub fn push(&self, e: Entry) -> Result<(), Box<Entry>> {
        {
            let mut q = self.entries.lock().unwrap();
            q.retain(|e| !e.tx.is_closed());
            if q.len() >= self.max {
                return Err(Box::new(e));
            }
            q.push_back(e);
        }
        self.notify.notify_waiters();
        Ok(())
    }

    /// Puts `e` back at the head (a request whose replica failed before it started).
    pub fn push_front(&self, e: Entry) {
        self.entries.lock().unwrap().push_front(e);
        self.notify.notify_waiters();
    }

    /// Takes the head if `fits` accepts it; requests whose client left are dropped.
    pub fn pop_if(&self, fits: impl Fn(&Entry) -> bool) -> Option<Entry> {
        let mut q = self.entries.lock().unwrap();
        while q.front().is_some_and(|e| e.tx.is_closed()) {
            q.pop_front();
        }
        if q.front().is_some_and(&fits) {
            q.pop_front()
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns everything queued.
    pub fn drain(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().drain(..).collect()
    }

    /// Resolves when something is pushed (or [`Queue::wake`] is called) after the
    /// returned future was created and polled or enabled.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    pub fn wake(&self) {
        self.notify.notify_waiters();
    }
}
