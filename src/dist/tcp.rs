//! Processes over TCP, star-shaped: rank 0 listens on MASTER_ADDR:MASTER_PORT, every other
//! rank connects to it. An all-reduce sends each rank's bucket to rank 0, which adds them in
//! rank order (rank 0 + rank 1 + ...) and sends the sum back, so every rank holds the same
//! bits. Meant for CPU runs (`--nproc-per-node N --device cpu`) and for exchanging the NCCL
//! id; gradients on GPUs go through NCCL.
//!
//! Every message carries its operation and sequence number, so ranks that took different
//! paths are told so; a rank that is silent for the timeout, or whose connection closes, ends
//! the job with an error naming it.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{Collective, Op};

const HELLO: &[u8; 4] = b"PRS1";

pub struct Tcp {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: a stream per other rank (index r - 1); other ranks: the stream to rank 0.
    peers: Mutex<Vec<TcpStream>>,
    seq: AtomicU64,
}

impl Tcp {
    /// Connects the job: rank 0 waits (up to `timeout`) for every other rank, which retry
    /// until rank 0 listens.
    pub fn connect(rank: usize, world: usize, addr: &str, port: u16, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let peers = if rank == 0 {
            accept_all(world, port, deadline, timeout)?
        } else {
            vec![connect_to_root(rank, world, addr, port, deadline, timeout)?]
        };
        for s in &peers {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
        }
        Ok(Self { rank, world, timeout, peers: Mutex::new(peers), seq: AtomicU64::new(0) })
    }

    fn peer_rank(&self, i: usize) -> usize {
        if self.rank == 0 {
            i + 1
        } else {
            0
        }
    }

    fn io_error(&self, e: std::io::Error, peer: usize, what: &str) -> anyhow::Error {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow!(
                "rank {peer} sent nothing for {:.0} s during {what} (hung, or far behind); stopping the job",
                self.timeout.as_secs_f64()
            ),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                anyhow!("the connection to rank {peer} closed during {what}: that rank stopped (see its output)")
            }
            _ => anyhow!("rank {} talking to rank {peer} during {what}: {e}", self.rank),
        }
    }

    /// The one exchange pattern: every rank sends `bytes` to rank 0, which combines them in
    /// rank order with `combine` and sends the result back (a broadcast sends nothing up).
    fn star(
        &self,
        op: u8,
        what: &str,
        bytes: Vec<u8>,
        combine: impl Fn(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let mut peers = self.peers.lock().map_err(|_| anyhow!("a collective panicked earlier"))?;
        let up = op != OP_BROADCAST;
        if self.rank == 0 {
            let mut all = vec![bytes];
            if up {
                for (i, s) in peers.iter_mut().enumerate() {
                    all.push(self.receive(s, i, op, seq, what)?);
                }
            }
            let out = combine(all)?;
            for (i, s) in peers.iter_mut().enumerate() {
                send(s, op, seq, &out).map_err(|e| self.io_error(e, self.peer_rank(i), what))?;
            }
            Ok(out)
        } else {
            let s = &mut peers[0];
            if up {
                send(s, op, seq, &bytes).map_err(|e| self.io_error(e, 0, what))?;
            }
            self.receive(s, 0, op, seq, what)
        }
    }

    /// Rank 0's bytes on every rank (the NCCL unique id).
    pub fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        self.star(OP_BROADCAST, "broadcast", bytes, |mut all| Ok(all.swap_remove(0)))
    }

    fn receive(&self, s: &mut TcpStream, i: usize, op: u8, seq: u64, what: &str) -> Result<Vec<u8>> {
        let peer = self.peer_rank(i);
        let mut head = [0u8; 17];
        s.read_exact(&mut head).map_err(|e| self.io_error(e, peer, what))?;
        let their_seq = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        ensure!(
            head[0] == op && their_seq == seq,
            "rank {peer} is at collective #{their_seq} ({}) while rank {} is at #{seq} ({what}): the ranks took \
             different paths",
            op_name(head[0]),
            self.rank
        );
        let len = u64::from_le_bytes(head[9..17].try_into().expect("8 bytes")) as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).map_err(|e| self.io_error(e, peer, what))?;
        Ok(buf)
    }
}

const OP_SUM: u8 = 1;
const OP_BROADCAST: u8 = 2;
const OP_VALUES: u8 = 3;

fn op_name(op: u8) -> &'static str {
    match op {
        OP_SUM => "all-reduce",
        OP_BROADCAST => "broadcast",
        OP_VALUES => "control values",
        _ => "unknown",
    }
}

fn send(s: &mut TcpStream, op: u8, seq: u64, bytes: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 17];
    head[0] = op;
    head[1..9].copy_from_slice(&seq.to_le_bytes());
    head[9..17].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(bytes)?;
    s.flush()
}

fn accept_all(world: usize, port: u16, deadline: Instant, timeout: Duration) -> Result<Vec<TcpStream>> {
    // Every interface: MASTER_ADDR is how the others reach this machine, maybe by a name.
    let listener = TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("rank 0 listening on port {port} (MASTER_PORT)"))?;
    listener.set_nonblocking(true)?;
    let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(timeout))?;
                let mut hello = [0u8; 12];
                s.read_exact(&mut hello).with_context(|| format!("reading the greeting of {from}"))?;
                let (r, w) = (
                    u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes")) as usize,
                    u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize,
                );
                ensure!(&hello[..4] == HELLO, "{from} connected to MASTER_PORT {port} but is not a prs rank");
                ensure!(
                    w == world,
                    "rank {r} ({from}) has WORLD_SIZE {w}, rank 0 has {world}: the launch variables disagree"
                );
                ensure!(r >= 1 && r < world, "{from} says it is rank {r} of {world}");
                ensure!(peers[r - 1].is_none(), "two processes say they are rank {r}");
                s.write_all(&[1])?;
                peers[r - 1] = Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    bail!(
                        "rank(s) {} did not connect to port {port} within {:.0} s; stopping the job",
                        missing.join(", "),
                        timeout.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting a rank"),
        }
    }
    Ok(peers.into_iter().map(|p| p.expect("all connected")).collect())
}

fn connect_to_root(
    rank: usize,
    world: usize,
    addr: &str,
    port: u16,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    let target = (addr, port).to_socket_addrs().with_context(|| format!("resolving MASTER_ADDR {addr}"))?.next();
    let target = target.with_context(|| format!("MASTER_ADDR {addr} resolves to no address"))?;
    loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(mut s) => {
                let mut hello = HELLO.to_vec();
                hello.extend((rank as u32).to_le_bytes());
                hello.extend((world as u32).to_le_bytes());
                s.write_all(&hello)?;
                s.set_read_timeout(Some(timeout))?;
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack)
                    .with_context(|| format!("rank 0 at {addr}:{port} refused rank {rank} (see its output)"))?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                bail!("rank {rank} could not reach rank 0 at {addr}:{port} within {:.0} s: {e}", timeout.as_secs_f64())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}

fn f32_tensor(b: &[u8], like: &Tensor) -> Result<Tensor> {
    let t = Tensor::from_raw_buffer(b, DType::F32, &[b.len() / 4], &Device::Cpu)?;
    Ok(t.reshape(like.shape())?.to_device(like.device())?)
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, bucket: &Tensor) -> Result<Tensor> {
        let n = bucket.elem_count();
        let out = self.star(OP_SUM, "all-reduce", f32_bytes(bucket)?, |all| {
            let mut acc: Option<Tensor> = None;
            for (r, b) in all.iter().enumerate() {
                ensure!(
                    b.len() == 4 * n,
                    "rank {r} sent {} values, rank 0 {n}: the ranks disagree on the model",
                    b.len() / 4
                );
                let t = Tensor::from_raw_buffer(b, DType::F32, &[n], &Device::Cpu)?;
                acc = Some(match acc {
                    None => t,
                    Some(a) => (a + t)?,
                });
            }
            f32_bytes(&acc.expect("world >= 1"))
        })?;
        f32_tensor(&out, bucket)
    }

    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        let out = self.star(OP_BROADCAST, "broadcast", f32_bytes(t)?, |mut all| Ok(all.swap_remove(0)))?;
        ensure!(
            out.len() == 4 * t.elem_count(),
            "rank 0 broadcast {} values, this rank expected {}",
            out.len() / 4,
            t.elem_count()
        );
        f32_tensor(&out, t)
    }

    fn all_reduce_values(&self, values: &[f64], op: Op) -> Result<Vec<f64>> {
        let mut bytes = vec![op as u8];
        bytes.extend_from_slice(bytemuck::cast_slice(values));
        let out = self.star(OP_VALUES, "control values", bytes, |all| {
            ensure!(all.iter().all(|b| b.first() == Some(&(op as u8))), "the ranks combine control values differently");
            let per: Vec<Vec<f64>> = all.iter().map(|b| bytemuck::pod_collect_to_vec(&b[1..])).collect();
            let mut out = vec![op as u8];
            out.extend_from_slice(bytemuck::cast_slice(&op.reduce(&per)?));
            Ok(out)
        })?;
        Ok(bytemuck::pod_collect_to_vec(&out[1..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_processes_worth_of_ranks_sum_in_order_and_a_dead_rank_is_named() {
        let port = free_port();
        let t = Duration::from_secs(60);
        let out: Vec<Result<(Vec<f32>, Vec<f64>)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || -> Result<(Vec<f32>, Vec<f64>)> {
                        let c = Tcp::connect(r, 3, "127.0.0.1", port, t)?;
                        let x = Tensor::new(&[[r as f32, 1.0], [2.0, 0.25]], &Device::Cpu)?;
                        let sum = c.all_reduce_sum(&x)?;
                        assert_eq!(sum.dims(), &[2, 2]);
                        assert_eq!(c.broadcast(&x)?.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 1.0, 2.0, 0.25]);
                        let m = c.all_reduce_values(&[r as f64, -(r as f64)], Op::Min)?;
                        c.barrier()?;
                        Ok((sum.flatten_all()?.to_vec1::<f32>()?, m))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in out {
            let (sum, m) = o.unwrap();
            assert_eq!(sum, vec![3.0, 3.0, 6.0, 0.75]);
            assert_eq!(m, vec![0.0, -2.0]);
        }
        // Rank 1 goes away after connecting: rank 0's all-reduce names it.
        let port = free_port();
        let e = std::thread::scope(|s| {
            let h0 = s.spawn(move || -> Result<()> {
                let c = Tcp::connect(0, 2, "127.0.0.1", port, t)?;
                c.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?)?;
                Ok(())
            });
            let c1 = Tcp::connect(1, 2, "127.0.0.1", port, t).unwrap();
            drop(c1);
            h0.join().unwrap()
        });
        let e = format!("{:#}", e.unwrap_err());
        assert!(e.contains("rank 1") && e.contains("closed"), "{e}");
    }

    pub fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }
}
