//! A TCP relay between a process under test and a server (PostgreSQL, RabbitMQ), for the
//! network's failures: cut (every connection closed, none taken again) or silenced (the
//! connections open now stay open and carry nothing more, either way, as when a host
//! vanishes without closing its sockets; new connections pass as before, as to the host
//! that took over its address).

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Every connection carries its bytes.
    Open,
    /// The connections up to this one (by number) carry nothing more; later ones do.
    Silenced(u64),
    /// Every connection is closed, and new ones are refused.
    Cut,
}

/// A relay on a local port to a server; dropped, it cuts every connection.
pub struct Relay {
    /// The local port to connect to instead of the server's.
    pub port: u16,
    state: watch::Sender<State>,
    /// The number of the last connection taken.
    taken: watch::Receiver<u64>,
}

impl Relay {
    /// Relay a local port to `server` (`host:port`).
    ///
    /// # Panics
    ///
    /// When no local port can be bound.
    pub async fn start(server: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a port");
        let port = listener.local_addr().expect("the relay's address").port();
        let (state, watched) = watch::channel(State::Open);
        let (count, taken) = watch::channel(0u64);
        tokio::spawn(async move {
            for number in 1.. {
                let mut cut = watched.clone();
                let (client, _) = tokio::select! {
                    _ = cut.wait_for(|state| *state == State::Cut) => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                count.send_replace(number);
                tokio::spawn(carry(client, server.clone(), number, watched.clone()));
            }
        });
        Relay { port, state, taken }
    }

    /// Close every connection and refuse new ones.
    pub fn cut(&self) {
        self.state.send_replace(State::Cut);
    }

    /// The connections open now carry nothing more, either way, and stay open; new ones
    /// carry as before.
    pub fn silence(&self) {
        let last = *self.taken.borrow();
        self.state.send_replace(State::Silenced(last));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Carry one connection's bytes until the relay cuts it; silenced, hold both sockets open
/// and carry nothing until then.
async fn carry(
    mut client: TcpStream,
    server: String,
    number: u64,
    mut state: watch::Receiver<State>,
) {
    let Ok(mut upstream) = TcpStream::connect(server).await else {
        let _ = client.shutdown().await;
        return;
    };
    let silenced = move |state: &State| match *state {
        State::Open => false,
        State::Silenced(last) => number <= last,
        State::Cut => true,
    };
    tokio::select! {
        _ = state.wait_for(silenced) => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => return,
    }
    // Held, not closed, until the relay is cut: no FIN, no RST, nothing.
    let _ = state.wait_for(|state| *state == State::Cut).await;
}
