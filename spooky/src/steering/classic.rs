//! The classic BPF tier: the program of [`super::cbpf`] on the reuseport group, and what keeps
//! its [`SocketTable`] true. At start a process's sockets are the group's, in worker order; a
//! process taking over appends its sockets after its predecessor's, and attaches a program
//! that knows both. When the predecessor has left, the group's order is no longer known (the
//! kernel moves the last socket into each freed place), so the process finds it again with
//! probes: a probe for index `k`, sent to our own address, is steered to socket `k`, and the
//! worker that receives it reports it on the [`ProbeBoard`].

use super::cbpf::{attach_cbpf, probe, reuseport_program, GenerationSockets, SocketTable};
use super::{Predecessor, SteeringError};
use spooky_common::CidLayout;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Probes per socket index before giving up.
const PROBE_TRIES: u32 = 3;
/// How long one probe may take to be reported.
const PROBE_WAIT: Duration = Duration::from_millis(200);

/// Where workers report the probes they receive: (socket index asked for, worker).
#[derive(Default, Debug)]
pub struct ProbeBoard {
    seen: Mutex<Vec<(u32, usize)>>,
}

impl ProbeBoard {
    /// Worker `worker` received the probe for socket `index`.
    pub fn report(&self, index: u32, worker: usize) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() < 4096 {
            seen.push((index, worker));
        }
    }

    fn take(&self) -> Vec<(u32, usize)> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The classic tier of one process.
pub(super) struct Classic {
    /// A handle on our first socket (a duplicate), to attach programs to the group.
    socket: UdpSocket,
    layout: CidLayout,
    pub(super) table: SocketTable,
    probes: Arc<ProbeBoard>,
    /// Where probes are sent: our own address.
    target: SocketAddr,
    workers: u32,
    /// The workers that died (their sockets left the group).
    dead: crate::board::WorkerSet,
}

impl Classic {
    /// Attaches the program for `sockets` (our workers, in order), appended after
    /// `predecessor`'s sockets when taking over.
    pub(super) fn attach(
        sockets: &[UdpSocket],
        layout: CidLayout,
        hash_key: u32,
        predecessor: Option<&Predecessor>,
        probes: Arc<ProbeBoard>,
    ) -> Result<Self, SteeringError> {
        let first = sockets.first().ok_or(SteeringError::NoSockets)?;
        let workers = sockets.len() as u32;
        let generation = layout.generation();
        let table = match predecessor {
            None => SocketTable {
                hash_key,
                ..SocketTable::alone(generation, workers)
            },
            Some(p) => {
                // Ours join after the predecessor's live workers' sockets.
                let base = if p.in_group > 0 {
                    p.in_group
                } else {
                    p.sockets.len() as u32
                };
                SocketTable {
                    newest: generation,
                    generations: vec![
                        GenerationSockets {
                            generation: p.generation,
                            sockets: p.sockets.clone(),
                        },
                        GenerationSockets {
                            generation,
                            sockets: (base..base + workers).collect(),
                        },
                    ],
                    hash_key,
                }
            }
        };
        let local = first.local_addr().map_err(SteeringError::Classic)?;
        let classic = Self {
            socket: first.try_clone().map_err(SteeringError::Classic)?,
            layout,
            table,
            probes,
            target: probe_target(local),
            workers,
            dead: Default::default(),
        };
        classic.install()?;
        Ok(classic)
    }

    fn install(&self) -> Result<(), SteeringError> {
        let prog = reuseport_program(&self.layout, &self.table);
        attach_cbpf(&self.socket, &prog).map_err(SteeringError::Classic)
    }

    /// Our sockets' indices in the group, for a successor.
    /// How many sockets of ours the group holds (our live workers').
    pub(super) fn in_group(&self) -> u32 {
        (0..self.workers)
            .filter(|w| !self.dead.contains(*w as usize))
            .count() as u32
    }

    pub(super) fn own_sockets(&self) -> Vec<u32> {
        self.table
            .of(self.layout.generation())
            .map(<[u32]>::to_vec)
            .unwrap_or_default()
    }

    /// A successor failed before it served: its program (which knew its sockets) goes, ours
    /// comes back. Our sockets kept their places: the successor's were after them.
    pub(super) fn take_back(&self) -> Result<(), SteeringError> {
        self.install()
    }

    /// The predecessor left the group: find our sockets' places again and attach a program
    /// that knows only us.
    pub(super) fn predecessor_gone(&mut self) -> Result<(), SteeringError> {
        let sockets = self.probe()?;
        self.table = SocketTable {
            newest: self.layout.generation(),
            generations: vec![GenerationSockets {
                generation: self.layout.generation(),
                sockets,
            }],
            hash_key: self.table.hash_key,
        };
        self.install()?;
        tracing::info!(table = ?self.table, "classic BPF program re-attached after the predecessor left");
        Ok(())
    }

    /// Worker `index` died and its socket left the group: find our sockets' places again,
    /// and send what hashes onto the dead worker (and what names it) to the next live one.
    pub(super) fn worker_died(&mut self, index: u32) -> Result<(), SteeringError> {
        self.dead.insert(index as usize);
        let sockets = self.probe()?;
        let generation = self.layout.generation();
        self.table
            .generations
            .retain(|g| g.generation != generation);
        self.table.generations.push(GenerationSockets {
            generation,
            sockets,
        });
        self.install()?;
        tracing::info!(table = ?self.table, "classic BPF program re-attached around the dead worker");
        Ok(())
    }

    /// Which group index each of our workers' sockets has now, by probing indices
    /// `0..live workers` (the group holds only our live workers' sockets); a dead worker gets
    /// the socket of the next live one.
    fn probe(&self) -> Result<Vec<u32>, SteeringError> {
        let sender = UdpSocket::bind(SocketAddr::new(unspecified_like(self.target.ip()), 0))
            .map_err(SteeringError::Classic)?;
        let dead = |w: u32| self.dead.contains(w as usize);
        let live = (0..self.workers).filter(|w| !dead(*w)).count() as u32;
        let mut sockets: Vec<Option<u32>> = vec![None; self.workers as usize];
        for index in 0..live {
            let byte = u8::try_from(index).map_err(|_| SteeringError::Probe(index))?;
            let mut found = false;
            for _ in 0..PROBE_TRIES {
                let _ = self.probes.take();
                sender
                    .send_to(&probe(byte), self.target)
                    .map_err(SteeringError::Classic)?;
                let deadline = Instant::now() + PROBE_WAIT;
                while Instant::now() < deadline {
                    let hit = self.probes.take().into_iter().find(|(k, _)| *k == index);
                    if let Some((k, worker)) = hit {
                        if let Some(slot) = sockets.get_mut(worker) {
                            *slot = Some(k);
                        }
                        found = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if found {
                    break;
                }
            }
            if !found {
                return Err(SteeringError::Probe(index));
            }
        }
        // Dead workers: the socket of the next live worker.
        let n = self.workers;
        (0..n)
            .map(|w| {
                (0..n)
                    .map(|step| (w + step) % n)
                    .find_map(|x| sockets.get(x as usize).copied().flatten())
                    .ok_or(SteeringError::Probe(w))
            })
            .collect()
    }
}

/// Where to send probes to reach `local` (a wildcard address is reached on loopback).
fn probe_target(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}
