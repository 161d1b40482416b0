//! A small client for Firecracker's HTTP API on its Unix socket (hyper 1, HTTP/1.1, one
//! kept-alive connection, `ready()` before every request), and the request bodies we send,
//! as strict as Firecracker's own models (`deny_unknown_fields`). A refused request becomes
//! [`ApiError::Fault`] carrying Firecracker's `fault_message`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to the Firecracker API socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP exchange with Firecracker for {method} {path} failed")]
    Http {
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("Firecracker refused {method} {path} ({status}): {fault_message}")]
    Fault {
        method: Method,
        path: String,
        status: StatusCode,
        fault_message: String,
    },
    #[error("cannot encode the body of {path}")]
    Encode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Firecracker's answer to {method} {path} is not the JSON expected")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// `PUT /logger`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    pub log_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
}

/// `PUT /serial`: where the guest's serial console goes (the daemonized VMM has no stdout).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    pub serial_out_path: String,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u32,
    #[serde(default)]
    pub smt: bool,
}

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

/// `GET /`.
#[derive(Debug, Clone, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: String,
    pub vmm_version: String,
}

#[derive(Deserialize)]
struct Fault {
    fault_message: String,
}

/// One connection to one Firecracker.
pub struct ApiClient {
    socket: PathBuf,
    sender: SendRequest<Full<Bytes>>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("socket", &self.socket)
            .finish()
    }
}

impl ApiClient {
    /// Connects and completes the HTTP/1 handshake; the connection task runs in the background.
    pub async fn connect(socket: &Path) -> Result<Self, ApiError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ApiError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| ApiError::Http {
                    method: Method::GET,
                    path: "(handshake)".into(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Firecracker API connection closed");
            }
        });
        Ok(ApiClient {
            socket: socket.to_path_buf(),
            sender,
        })
    }

    async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let http_error = |source| ApiError::Http {
            method: method.clone(),
            path: path.to_string(),
            source,
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a request built from a valid method and path");
        self.sender.ready().await.map_err(http_error)?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(http_error)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http_error)?
            .to_bytes();
        if !status.is_success() {
            let fault_message = serde_json::from_slice::<Fault>(&bytes)
                .map(|f| f.fault_message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ApiError::Fault {
                method,
                path: path.to_string(),
                status,
                fault_message,
            });
        }
        Ok(bytes)
    }

    /// `PUT path` with `body` as JSON; Firecracker answers 204.
    pub async fn put<T: Serialize>(&mut self, path: &str, body: &T) -> Result<(), ApiError> {
        let json = serde_json::to_vec(body).map_err(|source| ApiError::Encode {
            path: path.to_string(),
            source,
        })?;
        self.request(Method::PUT, path, Some(json)).await.map(drop)
    }

    /// `GET path`, its JSON answer decoded (e.g. `/vm/config` as a `serde_json::Value`).
    pub async fn get<T: serde::de::DeserializeOwned>(&mut self, path: &str) -> Result<T, ApiError> {
        let bytes = self.request(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|source| ApiError::Decode {
            method: Method::GET,
            path: path.into(),
            source,
        })
    }

    /// `GET /`: the instance's id and state.
    pub async fn instance_info(&mut self) -> Result<InstanceInfo, ApiError> {
        self.get("/").await
    }
}
