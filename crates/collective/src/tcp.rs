//! Multi-process collective over TCP: the ranks of a group are separate processes,
//! possibly on separate hosts, each joined to rank 0 by one socket (a star).
//!
//! This module owns those sockets, the handshake that forms the group, the wire format
//! and the failure rules. It is synchronous `std::net` code, meant to be called from the
//! blocking thread that runs a rank's forward pass.
//!
//! Every operation is one round: each other rank writes one frame with its contribution
//! to rank 0; rank 0 reads them in rank order, computes the result exactly as
//! [`crate::local`] does (f32 sums that start from rank 0's data and add rank 1, 2, ...
//! in turn; concatenation in rank order; the root's data), and writes the same result
//! frame to every rank. Every rank therefore ends with the same bits, and with the same
//! bits as `LocalCollective` for the same inputs. Data travels as little-endian f32
//! whatever the tensor's dtype and is converted back on arrival.
//!
//! Failures: every socket has read and write timeouts, so a dead or stalled peer becomes
//! [`CollectiveError::Timeout`] or [`CollectiveError::Broken`] rather than a hang. The
//! first error breaks the group for good: the rank tells its peers why (best effort),
//! shuts its sockets so they fail now instead of at their own timeout, and every later
//! call returns `Broken`. A broken replica is rebuilt, never retried.
//!
//! Wire format, integers little-endian:
//! - hello, rank r to rank 0: `MAGIC`, rank u32, world u32.
//! - welcome, rank 0 to every rank once the whole group has joined (or to explain why it
//!   will not form): `MAGIC`, status u8, 3 zero bytes, message length u32, message.
//! - frame, both ways, once per operation: op u8, status u8, 2 zero bytes, root u32,
//!   seq u64, ndims u32, 4 zero bytes, len u64, then ndims dims as u64, then `len` f32
//!   (status OK) or `len` bytes of UTF-8 saying why the sender gave up (other statuses).

use crate::host::{from_host, gathered_dims, to_host};
use crate::{Collective, CollectiveError, Result};
use candle_core::Tensor;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// Default time to wait on a peer (to join the group, or in any one socket read or
/// write of an operation) before declaring the group dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Names the protocol and its version: bump the digits on any change to the wire format.
const MAGIC: [u8; 8] = *b"SRCCOL01";
const HELLO_LEN: usize = 16;
const WELCOME_LEN: usize = 16;
const HEADER_LEN: usize = 32;
/// Bounds on what a peer can make us allocate before we have checked it against our own
/// call (payloads are only read once their length matches what this rank expects).
const MAX_DIMS: usize = 16;
const MAX_MESSAGE: usize = 64 * 1024;
/// How often rank 0 polls for joining ranks, and how soon a rank retries reaching rank 0.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
const CONNECT_RETRY: Duration = Duration::from_millis(20);
/// Bound on the best-effort goodbye, so that breaking the group never waits on a peer.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(100);

const STATUS_OK: u8 = 0;
/// The sender found the ranks' calls disagree; the receiver reports a `Mismatch`.
const STATUS_MISMATCH: u8 = 1;
/// The sender failed for any other reason; the receiver reports the group `Broken`.
const STATUS_FAILED: u8 = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Barrier = 1,
    AllReduce = 2,
    AllGather = 3,
    Broadcast = 4,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Barrier => "barrier",
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
        }
    }

    /// A call as it appears on the wire, for error messages.
    fn describe(code: u8, root: u32) -> String {
        match code {
            1 => "barrier".into(),
            2 => "all_reduce".into(),
            3 => "all_gather".into(),
            4 => format!("broadcast(root {root})"),
            other => format!("unknown op {other}"),
        }
    }
}

/// One rank's handle on a TCP group. Build one per process with [`TcpCollective::connect`].
pub struct TcpCollective {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Held for a whole operation: calls on one rank are serialized, as the wire requires.
    inner: Mutex<Inner>,
}

struct Inner {
    /// Rank 0: one link per other rank, in rank order. Other ranks: the link to rank 0.
    links: Vec<Link>,
    /// Operations started so far; sent with each frame so a skipped call is caught.
    seq: u64,
    broken: Option<String>,
    /// Reused buffers: the outgoing frame and an incoming payload.
    out: Vec<u8>,
    scratch: Vec<u8>,
}

impl TcpCollective {
    /// Joins the group as `rank` of `world`. Rank 0 listens on `rank0_addr`
    /// (e.g. "10.0.0.1:29500") and the others connect to it, retrying until `timeout`
    /// since rank 0 may start later. Returns once the whole group has joined, so it also
    /// acts as a first barrier; `timeout` bounds that wait and then every socket read
    /// and write of later operations. A group of one uses no sockets.
    pub fn connect(rank: usize, world: usize, rank0_addr: &str, timeout: Duration) -> Result<Self> {
        check_group(rank, world, timeout)?;
        if world == 1 {
            return Ok(Self::new(0, 1, timeout, Vec::new()));
        }
        if rank == 0 {
            let listener = TcpListener::bind(rank0_addr)
                .map_err(|e| CollectiveError::Broken(format!("rank 0 cannot listen on {rank0_addr}: {e}")))?;
            return Self::rank0_with_listener(listener, world, timeout);
        }
        let deadline = Instant::now() + timeout;
        let mut stream = dial(rank0_addr, deadline, timeout)?;
        let io_err = |e| io_error(e, "connect", 0, timeout);
        let left = time_left(deadline).ok_or_else(|| connect_timeout(timeout, vec![0]))?;
        stream.set_write_timeout(Some(left)).map_err(io_err)?;
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        stream.write_all(&hello).map_err(io_err)?;
        // Rank 0 answers once everyone has joined, or to say why the group will not form.
        let mut welcome = [0u8; WELCOME_LEN];
        stream.read_exact(&mut welcome).map_err(io_err)?;
        if welcome[..8] != MAGIC {
            return Err(CollectiveError::Broken(format!(
                "{rank0_addr} is not a sirocco collective rank 0 (or runs another protocol version)"
            )));
        }
        let len = le_u32(&welcome, 12) as usize;
        if len > MAX_MESSAGE {
            return Err(CollectiveError::Broken("rank 0 sent an oversized welcome".into()));
        }
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg).map_err(io_err)?;
        let msg = String::from_utf8_lossy(&msg).into_owned();
        match welcome[8] {
            STATUS_OK => {}
            STATUS_MISMATCH => return Err(CollectiveError::Mismatch { op: "connect", msg }),
            _ => return Err(CollectiveError::Broken(msg)),
        }
        configure(&stream, timeout).map_err(io_err)?;
        Ok(Self::new(rank, world, timeout, vec![Link { peer: 0, stream }]))
    }

    /// Rank 0's side of [`TcpCollective::connect`] on a listener the caller already bound
    /// (e.g. to port 0, then told the other ranks its address).
    pub fn rank0_with_listener(listener: TcpListener, world: usize, timeout: Duration) -> Result<Self> {
        check_group(0, world, timeout)?;
        if world == 1 {
            return Ok(Self::new(0, 1, timeout, Vec::new()));
        }
        let deadline = Instant::now() + timeout;
        let mut joined: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let formed = accept_all(&listener, &mut joined, deadline, timeout);
        // Tell every rank that joined how it ended, so none waits out its own timeout.
        let (status, msg) = match &formed {
            Ok(()) => (STATUS_OK, String::new()),
            Err(e) => report(0, e),
        };
        let mut links = Vec::with_capacity(world - 1);
        for (peer, stream) in joined.into_iter().enumerate() {
            let Some(mut stream) = stream else { continue };
            let sent = configure(&stream, timeout).and_then(|()| send_welcome(&mut stream, status, &msg));
            if let (Ok(()), Err(e)) = (&formed, sent) {
                return Err(io_error(e, "connect", peer, timeout));
            }
            links.push(Link { peer, stream });
        }
        formed?;
        Ok(Self::new(0, world, timeout, links))
    }

    /// Sets how long each later operation waits for a peer (joining may warrant a
    /// longer wait than steps do: ranks load their weights at different speeds).
    pub fn with_op_timeout(mut self, timeout: Duration) -> Result<Self> {
        check_group(self.rank, self.world, timeout)?;
        self.timeout = timeout;
        let inner = self
            .inner
            .get_mut()
            .map_err(|_| CollectiveError::Broken("lock poisoned".into()))?;
        for link in &inner.links {
            configure(&link.stream, timeout).map_err(|e| io_error(e, "connect", link.peer, timeout))?;
        }
        Ok(self)
    }

    fn new(rank: usize, world: usize, timeout: Duration, links: Vec<Link>) -> Self {
        Self {
            rank,
            world,
            timeout,
            inner: Mutex::new(Inner {
                links,
                seq: 0,
                broken: None,
                out: Vec::new(),
                scratch: Vec::new(),
            }),
        }
    }

    /// Runs one operation under the lock; its first error breaks the group for good.
    fn guarded<T>(&self, f: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| CollectiveError::Broken("lock poisoned".into()))?;
        if let Some(why) = &inner.broken {
            return Err(CollectiveError::Broken(why.clone()));
        }
        let result = f(&mut inner);
        if let Err(e) = &result {
            inner.break_group(self.rank, e);
        }
        result
    }

    fn tensor_op(&self, op: Op, t: &Tensor, root: usize) -> Result<Tensor> {
        self.guarded(|inner| {
            if root >= self.world {
                return Err(CollectiveError::Mismatch {
                    op: op.name(),
                    msg: format!("rank {} asked for root {root} in a group of {}", self.rank, self.world),
                });
            }
            if self.world == 1 {
                return Ok(t.clone());
            }
            let (data, dims) = to_host(t)?;
            let out = self.exchange(inner, op, root, data, &dims)?;
            let out_dims = match op {
                Op::AllGather => gathered_dims(&dims, self.world),
                _ => dims,
            };
            from_host(out, &out_dims, t.dtype(), t.device())
        })
    }

    /// One round: contributes `data` (of shape `dims`) and returns the result's data.
    fn exchange(&self, inner: &mut Inner, op: Op, root: usize, data: Vec<f32>, dims: &[usize]) -> Result<Vec<f32>> {
        let seq = inner.seq;
        inner.seq += 1;
        if self.rank == 0 {
            self.serve(inner, op, root, seq, data, dims)
        } else {
            self.contribute(inner, op, root, seq, data, dims)
        }
    }

    /// Rank 0: reads every contribution in rank order, computes, answers everyone.
    fn serve(
        &self,
        inner: &mut Inner,
        op: Op,
        root: usize,
        seq: u64,
        mine: Vec<f32>,
        dims: &[usize],
    ) -> Result<Vec<f32>> {
        let (name, timeout) = (op.name(), self.timeout);
        let Inner {
            links, out, scratch, ..
        } = inner;
        let n = mine.len();
        let mut result = match op {
            Op::Broadcast if root != 0 => Vec::new(),
            Op::AllGather => {
                let mut v = mine;
                v.reserve(n * (self.world - 1));
                v
            }
            _ => mine,
        };
        for link in links.iter_mut() {
            let r = link.peer;
            let hdr = link.recv_header(name, timeout)?;
            if hdr.status != STATUS_OK {
                return Err(link.recv_failure(&hdr, name, timeout));
            }
            if (hdr.op, hdr.seq, hdr.root) != (op as u8, seq, root as u32) {
                return Err(CollectiveError::Mismatch {
                    op: name,
                    msg: format!(
                        "rank 0 is in call #{seq} {} but rank {r} is in call #{} {}",
                        Op::describe(op as u8, root as u32),
                        hdr.seq,
                        Op::describe(hdr.op, hdr.root)
                    ),
                });
            }
            if hdr.dims != dims {
                return Err(CollectiveError::Mismatch {
                    op: name,
                    msg: format!("rank 0 sent shape {dims:?} but rank {r} sent {:?}", hdr.dims),
                });
            }
            let expected = payload_len(op, root, r, n);
            if hdr.len != expected {
                return Err(CollectiveError::Broken(format!(
                    "rank {r} sent {} values for {name} of shape {dims:?}, expected {expected}",
                    hdr.len
                )));
            }
            let bytes = link.recv_payload(scratch, hdr.len, name, timeout)?;
            match op {
                // Same arithmetic, in the same order, as LocalCollective.
                Op::AllReduce => {
                    for (s, x) in result.iter_mut().zip(f32s(bytes)) {
                        *s += x;
                    }
                }
                Op::AllGather => result.extend(f32s(bytes)),
                Op::Broadcast if r == root => result.extend(f32s(bytes)),
                _ => {}
            }
        }
        let out_dims = match op {
            Op::AllGather => gathered_dims(dims, self.world),
            _ => dims.to_vec(),
        };
        // Encoded once, sent to every rank: one write per peer.
        put_header(out, op as u8, STATUS_OK, root, seq, &out_dims, result.len() as u64);
        put_f32s(out, &result);
        for link in links.iter_mut() {
            link.send(out, name, timeout)?;
        }
        Ok(result)
    }

    /// Other ranks: send the contribution to rank 0 and wait for the result.
    fn contribute(
        &self,
        inner: &mut Inner,
        op: Op,
        root: usize,
        seq: u64,
        mine: Vec<f32>,
        dims: &[usize],
    ) -> Result<Vec<f32>> {
        let (name, timeout) = (op.name(), self.timeout);
        let Inner {
            links, out, scratch, ..
        } = inner;
        let link = links
            .first_mut()
            .ok_or_else(|| CollectiveError::Broken("no link to rank 0".into()))?;
        let n = mine.len();
        let len = payload_len(op, root, self.rank, n);
        put_header(out, op as u8, STATUS_OK, root, seq, dims, len);
        if len > 0 {
            put_f32s(out, &mine);
        }
        link.send(out, name, timeout)?;

        let hdr = link.recv_header(name, timeout)?;
        if hdr.status != STATUS_OK {
            return Err(link.recv_failure(&hdr, name, timeout));
        }
        let (out_dims, out_len) = match op {
            Op::Barrier => (Vec::new(), 0),
            Op::AllGather => (gathered_dims(dims, self.world), n * self.world),
            _ => (dims.to_vec(), n),
        };
        if (hdr.op, hdr.seq, hdr.root) != (op as u8, seq, root as u32)
            || hdr.dims != out_dims
            || hdr.len != out_len as u64
        {
            return Err(CollectiveError::Broken(format!(
                "rank 0 answered call #{seq} {} of shape {dims:?} with call #{} {} of shape {:?}",
                Op::describe(op as u8, root as u32),
                hdr.seq,
                Op::describe(hdr.op, hdr.root),
                hdr.dims
            )));
        }
        let bytes = link.recv_payload(scratch, hdr.len, name, timeout)?;
        Ok(f32s(bytes).collect())
    }
}

impl Inner {
    /// Marks the group broken, tells the peers why (best effort) and shuts the sockets
    /// so that they fail now rather than when their own timeout runs out.
    fn break_group(&mut self, me: usize, err: &CollectiveError) {
        let (status, msg) = report(me, err);
        put_header(&mut self.out, 0, status, 0, self.seq, &[], msg.len() as u64);
        self.out.extend_from_slice(msg.as_bytes());
        for link in &mut self.links {
            let _ = link.stream.set_write_timeout(Some(GOODBYE_TIMEOUT));
            let _ = link.stream.write_all(&self.out);
            let _ = link.stream.shutdown(Shutdown::Both);
        }
        self.broken = Some(err.to_string());
    }
}

impl fmt::Debug for TcpCollective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.tensor_op(Op::AllReduce, t, 0)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.tensor_op(Op::AllGather, t, 0)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.tensor_op(Op::Broadcast, t, root)
    }

    fn barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.guarded(|inner| self.exchange(inner, Op::Barrier, 0, Vec::new(), &[]).map(drop))
    }
}

/// One socket to a peer; turns its I/O failures into collective errors naming the peer.
struct Link {
    peer: usize,
    stream: TcpStream,
}

struct Header {
    op: u8,
    status: u8,
    root: u32,
    seq: u64,
    dims: Vec<usize>,
    /// f32 values (status OK) or message bytes (other statuses) that follow.
    len: u64,
}

impl Link {
    fn send(&mut self, bytes: &[u8], op: &'static str, timeout: Duration) -> Result<()> {
        self.stream
            .write_all(bytes)
            .map_err(|e| io_error(e, op, self.peer, timeout))
    }

    fn recv(&mut self, buf: &mut [u8], op: &'static str, timeout: Duration) -> Result<()> {
        self.stream
            .read_exact(buf)
            .map_err(|e| io_error(e, op, self.peer, timeout))
    }

    fn recv_header(&mut self, op: &'static str, timeout: Duration) -> Result<Header> {
        let mut h = [0u8; HEADER_LEN];
        self.recv(&mut h, op, timeout)?;
        let ndims = le_u32(&h, 16) as usize;
        let peer = self.peer;
        let corrupt = || CollectiveError::Broken(format!("rank {peer} sent a corrupt frame during {op}"));
        if ndims > MAX_DIMS {
            return Err(corrupt());
        }
        let mut raw = [0u8; MAX_DIMS * 8];
        self.recv(&mut raw[..ndims * 8], op, timeout)?;
        let dims = (0..ndims)
            .map(|i| usize::try_from(le_u64(&raw, i * 8)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| corrupt())?;
        Ok(Header {
            op: h[0],
            status: h[1],
            root: le_u32(&h, 4),
            seq: le_u64(&h, 8),
            dims,
            len: le_u64(&h, 24),
        })
    }

    /// Reads the body of a frame whose status is not OK: the error its sender reports.
    fn recv_failure(&mut self, hdr: &Header, op: &'static str, timeout: Duration) -> CollectiveError {
        if hdr.len > MAX_MESSAGE as u64 {
            return CollectiveError::Broken(format!("rank {} sent an oversized error report", self.peer));
        }
        let mut msg = vec![0u8; hdr.len as usize];
        if let Err(e) = self.recv(&mut msg, op, timeout) {
            return e;
        }
        let msg = String::from_utf8_lossy(&msg).into_owned();
        match hdr.status {
            STATUS_MISMATCH => CollectiveError::Mismatch { op, msg },
            _ => CollectiveError::Broken(msg),
        }
    }

    /// Reads `len` f32 values as raw bytes into `scratch`. Callers check `len` against
    /// their own call first, so a peer cannot make us allocate arbitrary amounts.
    fn recv_payload<'a>(
        &mut self,
        scratch: &'a mut Vec<u8>,
        len: u64,
        op: &'static str,
        timeout: Duration,
    ) -> Result<&'a [u8]> {
        let bytes = usize::try_from(len)
            .ok()
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| CollectiveError::Broken(format!("rank {} sent an impossible length", self.peer)))?;
        scratch.resize(bytes, 0);
        self.recv(scratch, op, timeout)?;
        Ok(scratch)
    }
}

/// f32 values a rank sends for `op`: broadcast needs only the root's data, barrier none.
fn payload_len(op: Op, root: usize, rank: usize, n: usize) -> u64 {
    match op {
        Op::Barrier => 0,
        Op::Broadcast if rank != root => 0,
        _ => n as u64,
    }
}

fn put_header(buf: &mut Vec<u8>, op: u8, status: u8, root: usize, seq: u64, dims: &[usize], len: u64) {
    buf.clear();
    buf.extend_from_slice(&[op, status, 0, 0]);
    buf.extend_from_slice(&(root as u32).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&len.to_le_bytes());
    for &d in dims {
        buf.extend_from_slice(&(d as u64).to_le_bytes());
    }
}

fn put_f32s(buf: &mut Vec<u8>, data: &[f32]) {
    buf.reserve(data.len() * 4);
    for x in data {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The status and message this rank sends its peers when `err` breaks the group.
/// Reports that already came from a peer are relayed as they are.
fn report(me: usize, err: &CollectiveError) -> (u8, String) {
    let (status, mut msg) = match err {
        CollectiveError::Mismatch { msg, .. } => (STATUS_MISMATCH, msg.clone()),
        CollectiveError::Broken(msg) => (STATUS_FAILED, msg.clone()),
        other => (STATUS_FAILED, format!("rank {me}: {other}")),
    };
    if msg.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    (status, msg)
}

fn io_error(e: io::Error, op: &'static str, peer: usize, timeout: Duration) -> CollectiveError {
    match e.kind() {
        // A socket read or write timeout reports WouldBlock on Unix, TimedOut on Windows.
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            op,
            timeout,
            missing: vec![peer],
        },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::NotConnected => CollectiveError::Broken(format!("rank {peer} disconnected during {op} ({e})")),
        _ => CollectiveError::Broken(format!("socket error with rank {peer} during {op}: {e}")),
    }
}

fn connect_timeout(timeout: Duration, missing: Vec<usize>) -> CollectiveError {
    CollectiveError::Timeout {
        op: "connect",
        timeout,
        missing,
    }
}

fn check_group(rank: usize, world: usize, timeout: Duration) -> Result<()> {
    let msg = if world == 0 || world > u32::MAX as usize {
        format!("a group cannot have {world} ranks")
    } else if rank >= world {
        format!("rank {rank} is not a rank of a group of {world}")
    } else if timeout.is_zero() {
        "the timeout must be positive".to_string()
    } else {
        return Ok(());
    };
    Err(CollectiveError::Mismatch { op: "connect", msg })
}

/// Time left before `deadline`, or `None` once it has passed.
fn time_left(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

/// Socket settings for an established link: frames go out at once, and no read or
/// write waits longer than `timeout`.
fn configure(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

/// Connects to rank 0, retrying until `deadline`: rank 0 may not be listening yet, and
/// its host name may not resolve yet either.
fn dial(addr: &str, deadline: Instant, timeout: Duration) -> Result<TcpStream> {
    loop {
        let left = time_left(deadline).ok_or_else(|| connect_timeout(timeout, vec![0]))?;
        match addr.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    if let Ok(stream) = TcpStream::connect_timeout(&a, left) {
                        return Ok(stream);
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::InvalidInput => {
                return Err(CollectiveError::Broken(format!("bad rank 0 address {addr:?}: {e}")));
            }
            Err(_) => {}
        }
        thread::sleep(CONNECT_RETRY.min(left));
    }
}

/// Rank 0: accepts connections until every other rank has said hello, filling `joined`
/// by rank. Connections that are not ours (bad magic, no hello) are dropped; a rank
/// whose hello contradicts the group is refused and fails the whole group.
fn accept_all(
    listener: &TcpListener,
    joined: &mut [Option<TcpStream>],
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    let world = joined.len();
    let broken = |what: &str, e: io::Error| CollectiveError::Broken(format!("rank 0 cannot {what}: {e}"));
    // std has no accept with a timeout: poll a non-blocking listener instead.
    listener
        .set_nonblocking(true)
        .map_err(|e| broken("poll its listener", e))?;
    let mut count = 1;
    while count < world {
        if time_left(deadline).is_none() {
            let missing = (1..world).filter(|&r| joined[r].is_none()).collect();
            return Err(connect_timeout(timeout, missing));
        }
        let (mut stream, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => continue,
            Err(e) => return Err(broken("accept connections", e)),
        };
        let Some((r, w)) = read_hello(&mut stream, deadline) else {
            continue;
        };
        let refusal = if w != world {
            Some(format!(
                "rank {r} (from {from}) was started with world size {w} but rank 0 with world size {world}"
            ))
        } else if r == 0 || r >= world {
            Some(format!(
                "a peer at {from} claims rank {r}, which is not a rank 1..{world}"
            ))
        } else if joined[r].is_some() {
            Some(format!("rank {r} joined twice (the second time from {from})"))
        } else {
            None
        };
        if let Some(msg) = refusal {
            let _ = stream.set_write_timeout(Some(GOODBYE_TIMEOUT));
            let _ = send_welcome(&mut stream, STATUS_MISMATCH, &msg);
            return Err(CollectiveError::Mismatch { op: "connect", msg });
        }
        joined[r] = Some(stream);
        count += 1;
    }
    Ok(())
}

/// Reads a joining rank's hello: `(rank, world)`, or `None` if it is not one of ours.
fn read_hello(stream: &mut TcpStream, deadline: Instant) -> Option<(usize, usize)> {
    // Accepted sockets inherit the listener's non-blocking mode on some platforms.
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(time_left(deadline)?)).ok()?;
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello).ok()?;
    if hello[..8] != MAGIC {
        return None;
    }
    Some((le_u32(&hello, 8) as usize, le_u32(&hello, 12) as usize))
}

fn send_welcome(stream: &mut TcpStream, status: u8, msg: &str) -> io::Result<()> {
    let mut buf = Vec::with_capacity(WELCOME_LEN + msg.len());
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&[status, 0, 0, 0]);
    buf.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    buf.extend_from_slice(msg.as_bytes());
    stream.write_all(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalGroup;
    use candle_core::{DType, Device};
    use std::net::SocketAddr;

    const LONG: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(300);

    fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    /// Forms a TCP group of `world`, one thread per rank, and runs `f` on each rank.
    fn tcp_group<F, T>(world: usize, timeout: Duration, f: F) -> Vec<T>
    where
        F: Fn(TcpCollective) -> T + Send + Copy + 'static,
        T: Send + 'static,
    {
        let (l, addr) = listener();
        let mut handles = vec![thread::spawn(move || {
            f(TcpCollective::rank0_with_listener(l, world, timeout).unwrap())
        })];
        for r in 1..world {
            let addr = addr.clone();
            handles.push(thread::spawn(move || {
                f(TcpCollective::connect(r, world, &addr, timeout).unwrap())
            }));
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn local_group<F, T>(world: usize, f: F) -> Vec<T>
    where
        F: Fn(&dyn Collective) -> T + Send + Copy + 'static,
        T: Send + 'static,
    {
        let handles: Vec<_> = LocalGroup::members(world)
            .into_iter()
            .map(|c| thread::spawn(move || f(&c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Values of mixed signs and magnitudes, so that f32 sums depend on their order.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let unit = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                unit * 10f32.powi((x % 9) as i32 - 4)
            })
            .collect()
    }

    fn bits(t: &Tensor, dtype: DType) -> (Vec<usize>, Vec<u32>) {
        assert_eq!(t.dtype(), dtype);
        let v = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (t.dims().to_vec(), v.iter().map(|x| x.to_bits()).collect())
    }

    /// Many rounds of every operation over assorted shapes (scalar and empty included);
    /// returns each result's shape and bits.
    fn script(c: &dyn Collective, dtype: DType) -> Vec<(Vec<usize>, Vec<u32>)> {
        let shapes: [&[usize]; 5] = [&[3, 5], &[7], &[], &[0, 4], &[2, 1, 3]];
        let mut out = Vec::new();
        for round in 0..20 {
            let dims = shapes[round % shapes.len()];
            let n = dims.iter().product();
            let seed = (c.rank() * 1000 + round) as u64;
            let t = Tensor::from_vec(values(seed, n), dims, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            out.push(bits(&c.all_reduce_sum(&t).unwrap(), dtype));
            out.push(bits(&c.all_gather(&t).unwrap(), dtype));
            out.push(bits(&c.broadcast(&t, round % c.world_size()).unwrap(), dtype));
            c.barrier().unwrap();
        }
        out
    }

    fn assert_matches_local(world: usize, dtype: DType) {
        let tcp = tcp_group(world, LONG, move |c| script(&c, dtype));
        let local = local_group(world, move |c| script(c, dtype));
        for (r, (t, l)) in tcp.iter().zip(&local).enumerate() {
            assert!(t == l, "world {world} {dtype:?}: rank {r} differs from LocalCollective");
            assert!(t == &tcp[0], "world {world} {dtype:?}: rank {r} differs from rank 0");
        }
    }

    #[test]
    fn results_match_local_collective_bit_for_bit() {
        for world in 2..=4 {
            assert_matches_local(world, DType::F32);
        }
    }

    #[test]
    fn test_values_make_summation_order_visible() {
        // Guards the bit-for-bit test above: with these inputs a different summation order
        // gives different bits, so a rank 0 that summed out of order would be caught.
        let ranks: Vec<Vec<f32>> = (0..4).map(|r| values(r * 1000, 15)).collect();
        let forward: Vec<u32> = (0..15)
            .map(|i| ranks.iter().fold(0.0f32, |s, v| s + v[i]).to_bits())
            .collect();
        let backward: Vec<u32> = (0..15)
            .map(|i| ranks.iter().rev().fold(0.0f32, |s, v| s + v[i]).to_bits())
            .collect();
        assert_ne!(forward, backward);
    }

    #[test]
    fn bf16_is_preserved_and_matches_local() {
        assert_matches_local(3, DType::BF16);
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TcpCollective>();
    }

    #[test]
    fn group_of_one_needs_no_sockets() {
        let c = TcpCollective::connect(0, 1, "not an address", LONG).unwrap();
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert_eq!(c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert_eq!(c.all_gather(&t).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        c.barrier().unwrap();
    }

    #[test]
    fn bad_arguments_are_errors() {
        for (rank, world, timeout) in [(2, 2, LONG), (0, 0, LONG), (1, 2, Duration::ZERO)] {
            let err = TcpCollective::connect(rank, world, "127.0.0.1:1", timeout).unwrap_err();
            assert!(matches!(err, CollectiveError::Mismatch { op: "connect", .. }), "{err}");
        }
        let err = TcpCollective::connect(1, 2, "no port here", LONG).unwrap_err();
        assert!(err.to_string().contains("bad rank 0 address"), "{err}");
    }

    #[test]
    fn wrong_world_size_is_refused() {
        let (l, addr) = listener();
        let rank0 = thread::spawn(move || TcpCollective::rank0_with_listener(l, 2, LONG).unwrap_err());
        let err1 = TcpCollective::connect(1, 3, &addr, LONG).unwrap_err().to_string();
        let err0 = rank0.join().unwrap().to_string();
        for err in [err0, err1] {
            assert!(err.contains("world size 3 but rank 0 with world size 2"), "{err}");
        }
    }

    #[test]
    fn duplicate_rank_is_refused() {
        let (l, addr) = listener();
        let rank0 = thread::spawn(move || TcpCollective::rank0_with_listener(l, 3, LONG).unwrap_err());
        let ranks: Vec<_> = (0..2)
            .map(|_| {
                let addr = addr.clone();
                thread::spawn(move || TcpCollective::connect(1, 3, &addr, LONG).unwrap_err())
            })
            .collect();
        let err0 = rank0.join().unwrap().to_string();
        assert!(err0.contains("rank 1 joined twice"), "{err0}");
        // Both claimants hear why, including the one that had been let in.
        for h in ranks {
            let err = h.join().unwrap().to_string();
            assert!(err.contains("rank 1 joined twice"), "{err}");
        }
    }

    #[test]
    fn stray_connections_are_ignored() {
        let (l, addr) = listener();
        drop(TcpStream::connect(&addr).unwrap());
        TcpStream::connect(&addr)
            .unwrap()
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .unwrap();
        let rank1 = thread::spawn(move || TcpCollective::connect(1, 2, &addr, LONG).unwrap().barrier());
        TcpCollective::rank0_with_listener(l, 2, LONG)
            .unwrap()
            .barrier()
            .unwrap();
        rank1.join().unwrap().unwrap();
    }

    #[test]
    fn ranks_may_start_before_rank_0_listens() {
        // Reserve a free port, free it, and start rank 0 on it only after rank 1 has begun
        // retrying.
        let addr: SocketAddr = listener().0.local_addr().unwrap();
        let rank1 = thread::spawn(move || {
            let c = TcpCollective::connect(1, 2, &addr.to_string(), LONG).unwrap();
            c.all_reduce_sum(&Tensor::new(&[2f32], &Device::Cpu).unwrap()).unwrap()
        });
        thread::sleep(Duration::from_millis(150));
        let c = TcpCollective::connect(0, 2, &addr.to_string(), LONG).unwrap();
        let t = c.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![3.0]);
        assert_eq!(rank1.join().unwrap().to_vec1::<f32>().unwrap(), vec![3.0]);
    }

    #[test]
    fn missing_rank_times_out_at_connect() {
        let (l, addr) = listener();
        let rank1 = thread::spawn(move || TcpCollective::connect(1, 3, &addr, SHORT).unwrap_err());
        let err0 = TcpCollective::rank0_with_listener(l, 3, SHORT).unwrap_err();
        assert!(
            matches!(&err0, CollectiveError::Timeout { missing, .. } if missing == &[2]),
            "{err0}"
        );
        let err1 = rank1.join().unwrap().to_string();
        assert!(err1.contains("timed out"), "{err1}");
    }

    #[test]
    fn stalled_rank_is_an_error_not_a_hang() {
        let out = tcp_group(3, SHORT, |c| {
            let start = Instant::now();
            if c.rank() == 2 {
                // Stops responding for a while, then finds the group broken.
                thread::sleep(Duration::from_millis(1000));
                return (c.barrier().unwrap_err(), start.elapsed());
            }
            let err = c.barrier().unwrap_err();
            let elapsed = start.elapsed();
            // Broken for good: later calls fail at once.
            let again = c.barrier().unwrap_err();
            assert!(matches!(again, CollectiveError::Broken(_)), "{again}");
            (err, elapsed)
        });
        for (r, (err, elapsed)) in out.iter().enumerate().take(2) {
            assert!(err.to_string().contains("timed out"), "rank {r}: {err}");
            assert!(*elapsed < Duration::from_millis(900), "rank {r} took {elapsed:?}");
        }
        assert!(
            matches!(&out[0].0, CollectiveError::Timeout { missing, .. } if missing == &[2]),
            "{}",
            out[0].0
        );
    }

    #[test]
    fn dropped_rank_breaks_the_group() {
        for leaver in [0, 1] {
            let out = tcp_group(2, LONG, move |c| {
                if c.rank() == leaver {
                    return None;
                }
                Some(c.barrier().unwrap_err().to_string())
            });
            let err = out[1 - leaver].as_ref().unwrap();
            assert!(err.contains(&format!("rank {leaver} disconnected")), "{err}");
        }
    }

    #[test]
    fn shape_mismatch_is_reported_on_every_rank() {
        let out = tcp_group(3, LONG, |c| {
            let n = if c.rank() == 2 { 4 } else { 3 };
            let t = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
            let err = c.all_reduce_sum(&t).unwrap_err();
            assert!(
                matches!(err, CollectiveError::Mismatch { op: "all_reduce", .. }),
                "{err}"
            );
            assert!(matches!(c.barrier(), Err(CollectiveError::Broken(_))));
            err.to_string()
        });
        for err in out {
            assert!(err.contains("rank 0 sent shape [3] but rank 2 sent [4]"), "{err}");
        }
    }

    #[test]
    fn op_mismatch_is_reported() {
        let out = tcp_group(2, LONG, |c| {
            let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
            if c.rank() == 0 {
                c.all_reduce_sum(&t).map(drop)
            } else {
                c.broadcast(&t, 1).map(drop)
            }
            .unwrap_err()
            .to_string()
        });
        for err in out {
            assert!(
                err.contains("call #0 all_reduce but rank 1 is in call #0 broadcast(root 1)"),
                "{err}"
            );
        }
    }
}
