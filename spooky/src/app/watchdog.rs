//! Workers that die while the process serves (a panic, a fatal error): the watchdog marks
//! the worker dead everywhere it matters. The steering stops giving it new connections
//! (eBPF: `alive = 0`; classic BPF: a program around it), its socket leaves the
//! SO_REUSEPORT group, every other worker's endpoint knows (new connections go to the next
//! live worker; packets of the dead worker's connections get a Stateless Reset, so those
//! clients reconnect at once), `/readyz` answers 503 naming it and `/status` shows it.
//! The process keeps serving with the others; a restart (`spooky --takeover`) brings the
//! worker back without closing the others' connections.

use super::takeover::Live;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

/// Held by a worker thread: when it is dropped (the thread ends, by returning or unwinding),
/// the watchdog hears which worker ended.
pub(super) struct Death {
    pub index: usize,
    pub to: Sender<usize>,
}

impl Drop for Death {
    fn drop(&mut self) {
        let _ = self.to.send(self.index);
    }
}

/// Starts the watchdog thread; it ends with the last worker.
pub(super) fn watch(deaths: Receiver<usize>, live: Arc<Live>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("spooky-watchdog".into())
        .spawn(move || {
            for index in deaths {
                if *live.shutdown.borrow() {
                    continue; // drained, as asked
                }
                died(index, &live);
            }
        })
        .map(|_| ())
}

fn died(index: usize, live: &Live) {
    tracing::error!(
        worker = index,
        "worker stopped while serving: its connections are lost (their clients get Stateless \
         Resets), new connections go to the other workers; restart Spooky to bring it back"
    );
    live.dead.insert(index);
    live.generations.send_modify(|g| g.dead.insert(index));
    let close = || {
        if let Ok(mut group) = live.group.lock() {
            if let Some(socket) = group.get_mut(index) {
                socket.take();
            }
        }
    };
    let mut steering = live.steering.lock().unwrap_or_else(|p| p.into_inner());
    let steered = match steering.as_mut() {
        Some(s) => s.worker_died(index as u32, close),
        None => {
            close();
            Ok(())
        }
    };
    if let Err(e) = steered {
        tracing::error!(worker = index, error = %e, "cannot steer around the dead worker");
    }
}
