//! In-process collective: the ranks of a group are threads sharing one exchange.
//!
//! Each operation is one "round": every rank deposits its buffer, the last to arrive
//! publishes all deposits, and each rank then computes the result from the same
//! published data in rank order, so results are bit-identical across ranks.
//! A rank that is dropped (its thread ended or panicked) breaks the group, and a rank
//! that never arrives turns into a timeout error rather than a hang.

use crate::host::{from_host, gathered_dims, to_host};
use crate::{Collective, CollectiveError, Result};
use candle_core::Tensor;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Default time a rank waits for its peers before declaring the group dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

struct Deposit {
    data: Vec<f32>,
    dims: Vec<usize>,
}

struct State {
    round: u64,
    pending: Vec<Option<Deposit>>,
    published: Arc<Vec<Deposit>>,
    broken: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// Constructor for the members of one in-process group.
pub struct LocalGroup;

impl LocalGroup {
    /// Returns one member per rank, in rank order.
    pub fn members(world: usize) -> Vec<LocalCollective> {
        Self::members_with_timeout(world, DEFAULT_TIMEOUT)
    }

    pub fn members_with_timeout(world: usize, timeout: Duration) -> Vec<LocalCollective> {
        assert!(world > 0, "a collective group needs at least one rank");
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                round: 0,
                pending: (0..world).map(|_| None).collect(),
                published: Arc::new(Vec::new()),
                broken: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One rank's handle on an in-process group.
pub struct LocalCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalCollective {
    /// Deposits `data` and returns every rank's deposit once all have arrived.
    fn exchange(&self, op: &'static str, data: Vec<f32>, dims: Vec<usize>) -> Result<Arc<Vec<Deposit>>> {
        let sh = &*self.shared;
        let mut st = sh
            .state
            .lock()
            .map_err(|_| CollectiveError::Broken("lock poisoned".into()))?;
        if let Some(why) = &st.broken {
            return Err(CollectiveError::Broken(why.clone()));
        }
        let my_round = st.round;
        st.pending[self.rank] = Some(Deposit { data, dims });
        if st.pending.iter().all(Option::is_some) {
            let all: Vec<Deposit> = st.pending.iter_mut().map(|d| d.take().unwrap()).collect();
            st.published = Arc::new(all);
            st.round += 1;
            sh.cv.notify_all();
            return Ok(st.published.clone());
        }
        let deadline = Instant::now() + sh.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let missing = (0..sh.world).filter(|&r| st.pending[r].is_none()).collect();
                let err = CollectiveError::Timeout {
                    op,
                    timeout: sh.timeout,
                    missing,
                };
                st.broken = Some(err.to_string());
                sh.cv.notify_all();
                return Err(err);
            }
            let (guard, _) = sh
                .cv
                .wait_timeout(st, deadline - now)
                .map_err(|_| CollectiveError::Broken("lock poisoned".into()))?;
            st = guard;
            if st.round > my_round {
                return Ok(st.published.clone());
            }
            if let Some(why) = &st.broken {
                return Err(CollectiveError::Broken(why.clone()));
            }
        }
    }
}

impl Drop for LocalCollective {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            if st.broken.is_none() && self.shared.world > 1 {
                st.broken = Some(format!("rank {} left the group", self.rank));
            }
            self.shared.cv.notify_all();
        }
    }
}

fn check_same_dims(op: &'static str, all: &[Deposit]) -> Result<()> {
    let first = &all[0].dims;
    for (r, d) in all.iter().enumerate() {
        if &d.dims != first {
            return Err(CollectiveError::Mismatch {
                op,
                msg: format!("rank 0 sent shape {first:?} but rank {r} sent {:?}", d.dims),
            });
        }
    }
    Ok(())
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.shared.world == 1 {
            return Ok(t.clone());
        }
        let (data, dims) = to_host(t)?;
        let all = self.exchange("all_reduce", data, dims.clone())?;
        check_same_dims("all_reduce", &all)?;
        let mut sum = all[0].data.clone();
        for d in &all[1..] {
            for (s, x) in sum.iter_mut().zip(&d.data) {
                *s += x;
            }
        }
        from_host(sum, &dims, t.dtype(), t.device())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if self.shared.world == 1 {
            return Ok(t.clone());
        }
        let (data, dims) = to_host(t)?;
        let all = self.exchange("all_gather", data, dims.clone())?;
        check_same_dims("all_gather", &all)?;
        let out: Vec<f32> = all.iter().flat_map(|d| d.data.iter().copied()).collect();
        from_host(out, &gathered_dims(&dims, self.shared.world), t.dtype(), t.device())
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.world {
            return Err(CollectiveError::Mismatch {
                op: "broadcast",
                msg: format!("root {root} is not a rank of a group of {}", self.shared.world),
            });
        }
        if self.shared.world == 1 {
            return Ok(t.clone());
        }
        let (data, dims) = to_host(t)?;
        let all = self.exchange("broadcast", data, dims.clone())?;
        check_same_dims("broadcast", &all)?;
        from_host(all[root].data.clone(), &dims, t.dtype(), t.device())
    }

    fn barrier(&self) -> Result<()> {
        if self.shared.world > 1 {
            self.exchange("barrier", Vec::new(), Vec::new())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::thread;

    fn run<F, T>(world: usize, f: F) -> Vec<T>
    where
        F: Fn(LocalCollective) -> T + Send + Sync + Copy + 'static,
        T: Send + 'static,
    {
        let handles: Vec<_> = LocalGroup::members(world)
            .into_iter()
            .map(|c| thread::spawn(move || f(c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_every_rank() {
        let out = run(4, |c| {
            let t = Tensor::new(&[c.rank() as f32, 1.0, 10.0 * c.rank() as f32], &Device::Cpu).unwrap();
            // Many rounds in a row catch a fast rank overtaking a slow one.
            let mut last = None;
            for _ in 0..50 {
                last = Some(c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap());
            }
            last.unwrap()
        });
        for r in out {
            assert_eq!(r, vec![6.0, 4.0, 60.0]);
        }
    }

    #[test]
    fn all_gather_concatenates_in_rank_order() {
        let out = run(3, |c| {
            let t = Tensor::full(c.rank() as f32, (2, 2), &Device::Cpu).unwrap();
            c.all_gather(&t).unwrap().to_vec2::<f32>().unwrap()
        });
        for r in out {
            assert_eq!(
                r,
                vec![
                    vec![0.0, 0.0],
                    vec![0.0, 0.0],
                    vec![1.0, 1.0],
                    vec![1.0, 1.0],
                    vec![2.0, 2.0],
                    vec![2.0, 2.0]
                ]
            );
        }
    }

    #[test]
    fn broadcast_takes_the_root_value_and_keeps_dtype() {
        let out = run(2, |c| {
            let t = Tensor::full(c.rank() as f32 + 5.0, 3, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let b = c.broadcast(&t, 1).unwrap();
            assert_eq!(b.dtype(), DType::BF16);
            c.barrier().unwrap();
            b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        });
        for r in out {
            assert_eq!(r, vec![6.0; 3]);
        }
    }

    #[test]
    fn missing_rank_is_a_timeout_not_a_hang() {
        let mut group = LocalGroup::members_with_timeout(3, Duration::from_millis(200));
        let absent = group.pop().unwrap(); // rank 2 never calls
        let h: Vec<_> = group
            .into_iter()
            .map(|c| thread::spawn(move || c.barrier().unwrap_err().to_string()))
            .collect();
        for e in h {
            let msg = e.join().unwrap();
            assert!(msg.contains("timed out") || msg.contains("broken"), "{msg}");
        }
        drop(absent);
    }

    #[test]
    fn dropped_rank_breaks_the_group() {
        let mut group = LocalGroup::members(2);
        let leaver = group.pop().unwrap();
        drop(leaver);
        let err = group[0].barrier().unwrap_err().to_string();
        assert!(err.contains("rank 1 left"), "{err}");
    }

    #[test]
    fn shape_mismatch_is_reported() {
        let out = run(2, |c| {
            let t = Tensor::zeros(c.rank() + 1, DType::F32, &Device::Cpu).unwrap();
            c.all_reduce_sum(&t).unwrap_err().to_string()
        });
        assert!(out[0].contains("shape"), "{}", out[0]);
    }
}
