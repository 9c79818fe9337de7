//! Services that are a Docker container managed by image digest (`manage-container = true`
//! beside `container = NAME`): a capture records the image id the container runs and the spec
//! it was created from; a restore re-creates it from that id, never a tag; an activation
//! re-creates it from the release's digest (`sha256:<image id>`). Spoken to over the Docker
//! Engine API on its unix socket, with hyper: the spec goes back exactly as `inspect` gave it,
//! which the `docker` command line cannot take.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::ServiceConfig;
use crate::errors::AgentError;

/// Where the Docker Engine listens unless a service says otherwise.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The Engine API version asked for (Docker 20.10 and later speak it).
const API: &str = "/v1.41";
/// Longest one call to the engine may take (a create or a stop included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer read from the engine.
const MAX_ANSWER_BYTES: usize = 4 << 20;
/// Longest a container is given to stop before it is killed (its own stop timeout, at most).
const MAX_STOP_S: u64 = 30;
/// Longest engine error kept in a step's detail.
const MAX_ERROR_BYTES: usize = 512;

/// A managed container as a snapshot records it: what is restored and compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub name: String,
    /// `sha256:` id of the image it runs: what a restore re-creates it from.
    pub image: String,
    /// sha256 of its spec (`Config` and `HostConfig` as the engine reports them, without what
    /// the engine makes up per container), whose bytes the store keeps.
    pub spec: String,
    pub running: bool,
}

/// The container `name` as it is now, with its spec's bytes; `None` when there is none (the
/// engine also answers an id prefix: a container of another name is none of ours).
pub fn inspect(service: &ServiceConfig) -> Result<Option<(ContainerState, Vec<u8>)>, AgentError> {
    Ok(inspect_with_id(service)?.map(|(state, spec, _)| (state, spec)))
}

/// [`inspect`], with the container's id.
fn inspect_with_id(
    service: &ServiceConfig,
) -> Result<Option<(ContainerState, Vec<u8>, String)>, AgentError> {
    let name = managed_name(service)?;
    let (status, body) = call(service, "GET", &format!("/containers/{name}/json"), None)?;
    if status == 404 {
        return Ok(None);
    }
    let inspected: Value = answer(service, status, &body, "inspect the container")?;
    if inspected["Name"].as_str() != Some(&format!("/{name}")) {
        return Ok(None);
    }
    let id = inspected["Id"].as_str().unwrap_or_default().to_string();
    let image = inspected["Image"].as_str().unwrap_or_default().to_string();
    check_image_id(service, &image)?;
    let mut config = inspected["Config"].as_object().cloned().unwrap_or_default();
    // Made up by the engine per container (or the host's, or another container's, for those
    // sharing a network namespace), or replaced by the image id on re-creation.
    config.remove("Image");
    let network_mode = inspected["HostConfig"]["NetworkMode"]
        .as_str()
        .unwrap_or_default();
    let shares_network = network_mode == "host" || network_mode.starts_with("container:");
    if shares_network || config.get("Hostname").and_then(Value::as_str) == id.get(..12) {
        config.remove("Hostname");
    }
    let spec = serde_json::json!({
        "Config": Value::Object(config),
        "HostConfig": inspected["HostConfig"].clone(),
    });
    let bytes = serde_json::to_vec(&spec).map_err(|error| invalid(service, error.to_string()))?;
    let state = ContainerState {
        name: name.to_string(),
        image,
        spec: rewind_shared::digest::sha256_hex(&bytes),
        running: inspected["State"]["Running"].as_bool().unwrap_or(false),
    };
    Ok(Some((state, bytes, id)))
}

/// The releases of a managed container activated here whose image is still on this host
/// (what a rollback can re-create it from), sorted; `None` when the engine cannot be asked.
pub fn retained_versions(
    service: &ServiceConfig,
    store: &crate::store::Store,
) -> Option<Vec<String>> {
    let (status, body) = call(service, "GET", "/images/json", None).ok()?;
    let images: Vec<Value> = answer(service, status, &body, "list images").ok()?;
    let present: std::collections::HashSet<&str> = images
        .iter()
        .filter_map(|image| image["Id"].as_str())
        .collect();
    let mut versions: Vec<String> = store
        .container_versions(&service.name)
        .ok()?
        .into_iter()
        .filter(|(_, image)| present.contains(image.as_str()))
        .map(|(version, _)| version)
        .collect();
    versions.sort();
    Some(versions)
}

/// Whether the image `id` is on this host.
pub fn image_present(service: &ServiceConfig, id: &str) -> Result<bool, AgentError> {
    check_image_id(service, id)?;
    let (status, body) = call(service, "GET", &format!("/images/{id}/json"), None)?;
    if status == 404 {
        return Ok(false);
    }
    let _: Value = answer(service, status, &body, "inspect the image")?;
    Ok(true)
}

/// Refuses, before anything changes, an image that is not on this host.
pub fn require_image(service: &ServiceConfig, id: &str) -> Result<(), AgentError> {
    if image_present(service, id)? {
        return Ok(());
    }
    Err(AgentError::Refused {
        field: "image".into(),
        message: format!(
            "image {id} of {} is no longer on this host: load or pull it by digest first \
             (a container is never re-created from a tag)",
            service.name
        ),
    })
}

/// Replaces the container with one created from `image` and `spec` (as [`inspect`] gave it),
/// started if `running`: the old one is stopped as `docker stop` would (its stop signal, then
/// its stop timeout, at most 30 s) and removed by id.
pub fn recreate(
    service: &ServiceConfig,
    image: &str,
    spec: &[u8],
    running: bool,
) -> Result<(), AgentError> {
    let name = managed_name(service)?;
    check_image_id(service, image)?;
    let spec: Value =
        serde_json::from_slice(spec).map_err(|error| invalid(service, error.to_string()))?;
    if let Some((_, old_spec, id)) = inspect_with_id(service)? {
        let old_spec: Value = serde_json::from_slice(&old_spec).unwrap_or(Value::Null);
        let grace = old_spec["Config"]["StopTimeout"]
            .as_u64()
            .unwrap_or(10)
            .min(MAX_STOP_S);
        let stop = format!("/containers/{id}/stop?t={grace}");
        let (status, body) = call(service, "POST", &stop, None)?;
        if !matches!(status, 204 | 304 | 404) {
            answer::<Value>(service, status, &body, "stop the container")?;
        }
        let (status, body) = call(service, "DELETE", &format!("/containers/{id}"), None)?;
        if !matches!(status, 204 | 404) {
            answer::<Value>(service, status, &body, "remove the container")?;
        }
    }
    let mut create: Map<String, Value> = spec["Config"].as_object().cloned().unwrap_or_default();
    create.insert("Image".into(), Value::String(image.to_string()));
    create.insert("HostConfig".into(), spec["HostConfig"].clone());
    let body = serde_json::to_vec(&create).map_err(|error| invalid(service, error.to_string()))?;
    let (status, answer_body) = call(
        service,
        "POST",
        &format!("/containers/create?name={name}"),
        Some(body),
    )?;
    let created: Value = answer(service, status, &answer_body, "create the container")?;
    if running {
        let id = created["Id"].as_str().unwrap_or(name);
        let (status, body) = call(service, "POST", &format!("/containers/{id}/start"), None)?;
        if !matches!(status, 204 | 304) {
            answer::<Value>(service, status, &body, "start the container")?;
        }
    }
    Ok(())
}

/// An activation: re-creates the container from `image` with the settings it was given
/// itself, not those its old image supplied (`inspect` merges the image's environment, command,
/// labels and the like into its config: carried over, they would override the new image's).
/// Safe to run again after a crash: the spec it creates from is kept in the store until the
/// container runs, and a container already running `image` is left alone. Returns the
/// container's name.
pub fn switch_image(
    service: &ServiceConfig,
    store: &crate::store::Store,
    image: &str,
) -> Result<String, AgentError> {
    require_image(service, image)?;
    let name = managed_name(service)?.to_string();
    let spec = match inspect(service)? {
        Some((state, _)) if state.image == image && state.running => return Ok(name),
        Some((state, spec)) => {
            let old = format!("/images/{}/json", state.image);
            let (status, body) = call(service, "GET", &old, None)?;
            let old_image: Value = answer(service, status, &body, "inspect the running image")?;
            let mut spec: Value = serde_json::from_slice(&spec)
                .map_err(|error| invalid(service, error.to_string()))?;
            if let Some(config) = spec["Config"].as_object_mut() {
                strip_image_defaults(config, &old_image["Config"]);
            }
            let spec =
                serde_json::to_vec(&spec).map_err(|error| invalid(service, error.to_string()))?;
            store.put_container_pending(&service.name, image, &spec)?;
            spec
        }
        // Removed and not yet created again (an earlier run stopped there): what it was
        // creating.
        None => match store.container_pending(&service.name)? {
            Some((pending, spec)) if pending == image => spec,
            _ => {
                return Err(AgentError::Refused {
                    field: "container".into(),
                    message: format!(
                        "{} has no container {name} to activate a release in: create it once \
                         (docker create or run), rewind re-creates it from then on",
                        service.name
                    ),
                });
            }
        },
    };
    recreate(service, image, &spec, true)?;
    store.clear_container_pending(&service.name)?;
    Ok(name)
}

/// Takes out of a container's config what its image supplied, so that another image's own
/// defaults apply: environment entries and labels the image set (unless the container changed
/// them), and the command, entrypoint and the like where they are the image's.
fn strip_image_defaults(config: &mut Map<String, Value>, image: &Value) {
    if let (Some(Value::Array(env)), Some(defaults)) =
        (config.get_mut("Env"), image["Env"].as_array())
    {
        env.retain(|entry| !defaults.contains(entry));
    }
    if let (Some(Value::Object(labels)), Some(defaults)) =
        (config.get_mut("Labels"), image["Labels"].as_object())
    {
        labels.retain(|key, value| defaults.get(key) != Some(value));
    }
    for key in [
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "User",
        "ExposedPorts",
        "Volumes",
        "StopSignal",
        "Healthcheck",
        "Shell",
        "OnBuild",
    ] {
        if config
            .get(key)
            .is_some_and(|value| image.get(key) == Some(value))
        {
            config.remove(key);
        }
    }
}

/// The container name of a managed service.
fn managed_name(service: &ServiceConfig) -> Result<&str, AgentError> {
    service
        .container
        .as_deref()
        .filter(|_| service.manage_container)
        .ok_or_else(|| invalid(service, "its container is not managed".into()))
}

fn check_image_id(service: &ServiceConfig, id: &str) -> Result<(), AgentError> {
    let hex = id.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() == 64
        && hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Ok(());
    }
    Err(AgentError::Invalid {
        field: "image".into(),
        message: format!(
            "{id:?} is not an image id like sha256:<64 hex> (service {}): containers are \
             named by digest, never by tag",
            service.name
        ),
    })
}

fn invalid(service: &ServiceConfig, message: String) -> AgentError {
    AgentError::Command {
        command: format!("docker engine for {}", service.name),
        reason: message,
    }
}

/// The engine's answer as JSON, or its error message naming what was tried.
fn answer<T: serde::de::DeserializeOwned>(
    service: &ServiceConfig,
    status: u16,
    body: &[u8],
    what: &str,
) -> Result<T, AgentError> {
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|value| value["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        let mut message = rewind_shared::names::for_terminal(&message).into_owned();
        if message.len() > MAX_ERROR_BYTES {
            let mut cut = MAX_ERROR_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        return Err(invalid(
            service,
            format!("{what}: HTTP {status}: {message}"),
        ));
    }
    serde_json::from_slice(body).map_err(|error| invalid(service, format!("{what}: {error}")))
}

/// One request to the engine, from synchronous code (captures, restores and drift checks run
/// on blocking threads): a thread of its own with a small runtime, bounded by [`CALL_TIMEOUT`]
/// and [`MAX_ANSWER_BYTES`].
fn call(
    service: &ServiceConfig,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), AgentError> {
    let socket = service.docker_socket.clone();
    let uri = format!("http://docker{API}{path}");
    let method = method.to_string();
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| error.to_string())?;
                runtime.block_on(async {
                    tokio::time::timeout(CALL_TIMEOUT, request(&socket, &method, &uri, body))
                        .await
                        .map_err(|_| format!("no answer within {} s", CALL_TIMEOUT.as_secs()))?
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the engine call panicked".to_string()))
    });
    outcome.map_err(|reason| invalid(service, reason))
}

async fn request(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|error| {
            format!(
                "cannot reach the Docker engine at {}: {error} (is Docker running, and may this \
             agent use its socket?)",
                socket.display()
            )
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|error| error.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::HOST, "docker")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status().as_u16();
    let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|error| format!("reading the answer: {error}"))?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_image_brings_its_own_defaults_and_the_containers_own_settings_stay() {
        let image = serde_json::json!({
            "Env": ["PATH=/bin", "RELEASE=v1"],
            "Cmd": ["/app"],
            "Labels": {"built-by": "ci", "tier": "web"},
            "WorkingDir": "/srv",
        });
        let mut config = serde_json::json!({
            "Env": ["PATH=/bin", "RELEASE=v1", "EXTRA=kept"],
            "Cmd": ["/app"],
            "Labels": {"built-by": "ci", "tier": "payments", "team": "a"},
            "WorkingDir": "/data",
            "Tty": false,
        });
        strip_image_defaults(config.as_object_mut().unwrap(), &image);
        assert_eq!(
            config,
            serde_json::json!({
                "Env": ["EXTRA=kept"],
                "Labels": {"tier": "payments", "team": "a"},
                "WorkingDir": "/data",
                "Tty": false,
            })
        );
    }

    #[test]
    fn images_are_named_by_id_never_by_tag() {
        let service = ServiceConfig::bare("web", Path::new("/srv/web"));
        for bad in ["web:v1", "sha256:abc", "", "sha256:../../x"] {
            assert!(check_image_id(&service, bad).is_err(), "{bad}");
        }
        assert!(check_image_id(&service, &format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
