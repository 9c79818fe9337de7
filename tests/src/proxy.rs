//! A TCP proxy on loopback that can cut a connection in the middle of a transfer: the test puts
//! it in front of a member (its advertised address) to drop a snapshot stream part-way, as a
//! network fault or a crashed middlebox would. TLS passes through it untouched.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

pub struct CuttingProxy {
    /// Where it listens (127.0.0.1:port).
    pub address: String,
    faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Faults {
    /// When not 0: the next connection that carries more than this many bytes towards the
    /// target is cut (once; then it goes back to 0).
    cut_after_bytes: AtomicU64,
    cuts: AtomicU64,
}

impl CuttingProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn must_start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy");
        let address = listener.local_addr().expect("proxy address").to_string();
        let faults = Arc::new(Faults::default());
        let target = target.to_string();
        let shared = Arc::clone(&faults);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, target.clone(), Arc::clone(&shared)));
            }
        });
        Self {
            address,
            faults,
            task,
        }
    }

    /// Cuts the next connection that carries more than `bytes` towards the target, once.
    pub fn cut_next_connection_after(&self, bytes: u64) {
        self.faults.cut_after_bytes.store(bytes, Ordering::SeqCst);
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.faults.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, target: String, faults: Arc<Faults>) {
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let towards_target = async {
        let mut buffer = vec![0; 64 * 1024];
        let mut carried: u64 = 0;
        loop {
            let read = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            carried += read as u64;
            let limit = faults.cut_after_bytes.load(Ordering::SeqCst);
            if limit != 0
                && carried > limit
                && faults
                    .cut_after_bytes
                    .compare_exchange(limit, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                faults.cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if server_write.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    };
    let back = tokio::io::copy(&mut server_read, &mut client_write);
    // Whichever direction ends first ends the connection: both halves are dropped here.
    tokio::select! {
        _ = towards_target => {}
        _ = back => {}
    }
}
