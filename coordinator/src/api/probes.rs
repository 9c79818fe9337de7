//! The standard gRPC services every member serves beside `rewind.v1`: health checking
//! (`grpc.health.v1.Health`) and server reflection (`grpc.reflection.v1` and `v1alpha`), so
//! load balancers, Kubernetes probes, `grpcurl` and other tools find and describe the
//! coordinator without its proto files.
//!
//! What each health status means (the README's "Health checks and reflection"):
//! - `""` (the member as a whole): SERVING while this member runs and knows a leader, that is,
//!   its cluster has a quorum; NOT_SERVING during an election or without a quorum.
//! - `rewind.v1.RaftService` and `rewind.v1.MemberService`: SERVING while this member runs
//!   (for liveness: a member without a quorum is waiting, not broken, and restarting it helps
//!   nobody).
//! - `rewind.v1.ControlService`, `AgentService` and `JoinService`: SERVING on the leader only,
//!   the one member that serves people and agents (for readiness, and for load balancers).
//!
//! On shutdown every status turns NOT_SERVING and then is cleared, so open `Watch` streams end
//! and the graceful shutdown is not held up by them.
//!
//! Kubernetes' gRPC probes (and some load balancers) speak plaintext only, so the health
//! service alone can also be served on a plaintext port of its own (`health.probe-listen`,
//! [`serve_probe_port`]): the same statuses, nothing else, at most [`MAX_PROBE_CONNECTIONS`]
//! connections and [`PROBE_CONNECTIONS_PER_ADDRESS`] from one address (more are closed at
//! once), each for at most [`PROBE_CONNECTION_LIFETIME`].

use rewind_proto::v1::agent_service_server::AgentServiceServer;
use rewind_proto::v1::control_service_server::ControlServiceServer;
use rewind_proto::v1::join_service_server::JoinServiceServer;
use rewind_proto::v1::member_service_server::MemberServiceServer;
use rewind_proto::v1::raft_service_server::RaftServiceServer;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::transport::server::Connected;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admission::{Admission, Admitted};
use crate::node::raft::RaftStatus;

/// Every descriptor set served, so reflection describes every service a member answers and the
/// permission table's test walks every method of them.
pub const DESCRIPTOR_SETS: [&[u8]; 4] = [
    rewind_proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// Largest health request accepted (a service name): the longest name served is 30 bytes.
pub const MAX_HEALTH_REQUEST_BYTES: usize = 1024;
/// Largest reflection request accepted (a symbol or file name, or an extension query).
pub const MAX_REFLECTION_REQUEST_BYTES: usize = 16 * 1024;

/// Most connections open at once on the plaintext probe port.
pub const MAX_PROBE_CONNECTIONS: usize = 256;
/// Most of them from one address (a kubelet probes a pod one probe at a time).
pub const PROBE_CONNECTIONS_PER_ADDRESS: usize = 4;
/// Longest one probe connection stays open (a `Watch` held open ends with it).
pub const PROBE_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves `health` alone, in plaintext, on `listener` until `shutdown`.
pub async fn serve_probe_port(
    listener: TcpListener,
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let places = Admission::new(MAX_PROBE_CONNECTIONS, PROBE_CONNECTIONS_PER_ADDRESS);
    let refusals = std::sync::Arc::new(crate::admission::PeerLog::default());
    let state = (listener, places, refusals);
    let incoming = futures::stream::unfold(state, |(listener, places, refusals)| async move {
        loop {
            match listener.accept().await {
                // Over a bound: closed at once (dropped), so one address cannot hold the port
                // and a flood does not queue the kubelet's probes behind it.
                Ok((stream, remote)) => {
                    let slot = match places.try_admit(remote.ip()) {
                        Ok(slot) => slot,
                        Err(refusal) => {
                            if let Some(not_logged) = refusals.admit(remote.ip(), "probe_port") {
                                tracing::warn!(
                                    %remote,
                                    ?refusal,
                                    not_logged_since_last = not_logged,
                                    "Closed a connection to the health probe port: over its bounds."
                                );
                            }
                            continue;
                        }
                    };
                    let connection = ProbeConnection {
                        stream,
                        _slot: slot,
                        deadline: Box::pin(tokio::time::sleep(PROBE_CONNECTION_LIFETIME)),
                    };
                    return Some((
                        Ok::<_, std::io::Error>(connection),
                        (listener, places, refusals),
                    ));
                }
                // Out of descriptors, say: wait rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(4))
        .add_service(health.max_decoding_message_size(MAX_HEALTH_REQUEST_BYTES))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// A connection to the probe port: it holds its place until dropped and ends at its deadline.
struct ProbeConnection {
    stream: TcpStream,
    _slot: Admitted,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl ProbeConnection {
    fn expired(&mut self, context: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(context).is_ready()
    }
}

fn expired() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "a probe connection lives 30 s",
    )
}

impl Connected for ProbeConnection {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for ProbeConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expired(context) {
            return Poll::Ready(Err(expired()));
        }
        Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for ProbeConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(context) {
            return Poll::Ready(Err(expired()));
        }
        Pin::new(&mut self.stream).poll_write(context, buffer)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}

/// What the member is, for its statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Standing {
    /// Running: its store works and it can apply what is committed.
    running: bool,
    /// Knows a leader (its cluster has a quorum).
    has_leader: bool,
    /// Leads, with an entry of its term committed and applied.
    leads: bool,
}

impl Standing {
    fn of(status: &RaftStatus) -> Self {
        let running = status.storage_failed.is_none() && status.cannot_apply.is_none();
        Self {
            running,
            has_leader: running && status.leader_id != 0,
            leads: running && status.is_leader,
        }
    }
}

/// Every service name with a status, and the status it has when the member stands so.
fn statuses(standing: Standing) -> [(&'static str, ServingStatus); 6] {
    let serving = |yes: bool| {
        if yes {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    [
        ("", serving(standing.has_leader)),
        (
            <RaftServiceServer<()> as NamedService>::NAME,
            serving(standing.running),
        ),
        (
            <MemberServiceServer<()> as NamedService>::NAME,
            serving(standing.running),
        ),
        (
            <ControlServiceServer<()> as NamedService>::NAME,
            serving(standing.leads),
        ),
        (
            <AgentServiceServer<()> as NamedService>::NAME,
            serving(standing.leads),
        ),
        (
            <JoinServiceServer<()> as NamedService>::NAME,
            serving(standing.leads),
        ),
    ]
}

/// Sets every status from `status` now, then again each time the member's standing changes,
/// until `stop` fires; then every status turns NOT_SERVING and is cleared.
pub struct HealthFollower {
    reporter: HealthReporter,
    status: watch::Receiver<RaftStatus>,
    standing: Standing,
}

impl HealthFollower {
    /// Sets the statuses for the member's standing now: call before serving, so no probe sees
    /// the reporter's defaults.
    pub async fn start(reporter: HealthReporter, status: watch::Receiver<RaftStatus>) -> Self {
        let standing = Standing::of(&status.borrow());
        for (name, serving) in statuses(standing) {
            reporter.set_service_status(name, serving).await;
        }
        Self {
            reporter,
            status,
            standing,
        }
    }

    /// Follows the standing until the status channel closes or `stop` resolves.
    pub async fn follow(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                changed = self.status.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let standing = Standing::of(&self.status.borrow_and_update());
                    self.set(standing).await;
                }
            }
        }
        self.set(Standing {
            running: false,
            has_leader: false,
            leads: false,
        })
        .await;
        for (name, _) in statuses(self.standing) {
            self.reporter.clear_service_status(name).await;
        }
    }

    /// Sets the statuses that differ between the last standing and `standing`: a watcher is
    /// told of changes only.
    async fn set(&mut self, standing: Standing) {
        let before = statuses(self.standing);
        for ((name, serving), (_, was)) in statuses(standing).into_iter().zip(before) {
            if serving != was {
                self.reporter.set_service_status(name, serving).await;
            }
        }
        self.standing = standing;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(leader_id: u64, is_leader: bool) -> RaftStatus {
        RaftStatus {
            id: 1,
            leader_id,
            is_leader,
            ..RaftStatus::default()
        }
    }

    fn of(status: &RaftStatus) -> Vec<(&'static str, ServingStatus)> {
        statuses(Standing::of(status)).to_vec()
    }

    #[test]
    fn only_the_leader_serves_people_and_agents_and_a_quorum_makes_the_member_serve() {
        use ServingStatus::{NotServing, Serving};
        let leader = of(&status(1, true));
        assert!(leader.iter().all(|(_, serving)| *serving == Serving));
        let follower = of(&status(2, false));
        for (name, serving) in &follower {
            let expected = if name.ends_with("ControlService")
                || name.ends_with("AgentService")
                || name.ends_with("JoinService")
            {
                NotServing
            } else {
                Serving
            };
            assert_eq!(*serving, expected, "{name:?} on a follower");
        }
        let election = of(&status(0, false));
        for (name, serving) in &election {
            let expected = if name.ends_with("RaftService") || name.ends_with("MemberService") {
                Serving
            } else {
                NotServing
            };
            assert_eq!(*serving, expected, "{name:?} during an election");
        }
        let mut failed = status(1, true);
        failed.storage_failed = Some("fsync".into());
        assert!(
            of(&failed)
                .iter()
                .all(|(_, serving)| *serving == NotServing)
        );
    }

    #[tokio::test]
    async fn watchers_hear_changes_only_and_end_at_stop() {
        use futures::FutureExt as _;
        use tokio_stream::StreamExt as _;
        use tonic_health::pb::health_server::Health;
        use tonic_health::pb::{HealthCheckRequest, health_check_response};

        let reporter = HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let (sender, receiver) = watch::channel(status(2, false));
        let mut follower = HealthFollower::start(reporter, receiver).await;
        let request = |name: &str| {
            tonic::Request::new(HealthCheckRequest {
                service: name.to_string(),
            })
        };
        let control = <ControlServiceServer<()> as NamedService>::NAME;
        let mut watch = service.watch(request(control)).await.unwrap().into_inner();
        let status_of = |item: Option<
            Result<tonic_health::pb::HealthCheckResponse, tonic::Status>,
        >| { item.map(|response| response.unwrap().status) };
        let not_serving = Some(health_check_response::ServingStatus::NotServing as i32);
        let serving = Some(health_check_response::ServingStatus::Serving as i32);
        assert_eq!(status_of(watch.next().await), not_serving);
        // The same standing again (a new term, say) is no change to a watcher.
        follower.set(Standing::of(&status(3, false))).await;
        assert!(watch.next().now_or_never().is_none(), "told of no change");
        let unknown = service
            .check(request("rewind.v1.Nothing"))
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(follower.follow(async move {
            let _ = stopped.await;
        }));
        sender.send_modify(|status| {
            status.leader_id = 1;
            status.is_leader = true;
        });
        assert_eq!(status_of(watch.next().await), serving);
        stop.send(()).unwrap();
        task.await.unwrap();
        // Told it stopped serving, then the stream ends.
        let rest: Vec<_> = watch.map(|item| item.unwrap().status).collect().await;
        assert_eq!(
            rest.into_iter().map(Some).collect::<Vec<_>>(),
            vec![not_serving]
        );
        let cleared = service.check(request(control)).await.unwrap_err();
        assert_eq!(cleared.code(), tonic::Code::NotFound);
    }
}
