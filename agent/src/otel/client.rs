//! OTLP transport for bodies Tapir encodes itself: unary `Export` over gRPC (tonic, with a
//! codec that passes the protobuf bytes through) and OTLP/HTTP protobuf (reqwest POST).
//!
//! The SDK exporters take `SpanData`/`ResourceMetrics` and convert them again; Tapir
//! encodes spans straight from captured exchanges, so it needs a transport for bytes.
//! Settings follow the standard `OTEL_EXPORTER_OTLP_[{TRACES,METRICS}_]*` variables (the
//! signal's own variable wins over the general one).
use std::{path::PathBuf, time::Duration};

use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use tonic::{
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{MetadataKey, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
    Code, Status,
};

use super::{
    coalesce::CoalescingConnector,
    export::{OtlpProtocol, Signal, Target},
};

/// Default time one export call may take (`OTEL_EXPORTER_OTLP_TIMEOUT`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How one signal is sent, from the target and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub protocol: OtlpProtocol,
    /// Full URL: with a scheme, and for http/protobuf with the signal's path.
    pub url: String,
    /// Extra request headers (gRPC metadata), lower-cased names.
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub gzip: bool,
    /// PEM file of the CA that signs the collector's certificate.
    pub ca_file: Option<PathBuf>,
}

impl ClientSettings {
    /// Reads `OTEL_EXPORTER_OTLP_{HEADERS,TIMEOUT,COMPRESSION,INSECURE,CERTIFICATE}` (the
    /// signal-specific form first). Returns warnings for values not understood.
    pub fn resolve(
        target: &Target,
        signal: Signal,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let sig = signal.env_part();
        // (variable that was set, its value)
        let get = |name: &str| -> Option<(String, String)> {
            [
                format!("OTEL_EXPORTER_OTLP_{sig}_{name}"),
                format!("OTEL_EXPORTER_OTLP_{name}"),
            ]
            .into_iter()
            .find_map(|var| {
                let v = env(&var)?.trim().to_string();
                (!v.is_empty()).then_some((var, v))
            })
        };
        let headers = match get("HEADERS") {
            Some((var, v)) => {
                let (pairs, bad) = parse_headers(&v);
                if let Some(bad) = bad {
                    warnings.push(format!(
                        "{var}: {bad:?} is not key=value; expected k1=v1,k2=v2 (ignoring that entry)"
                    ));
                }
                pairs
            }
            None => Vec::new(),
        };
        let timeout = match get("TIMEOUT") {
            Some((var, v)) => match v.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    warnings.push(format!(
                        "{var}={v:?} is not a positive number of milliseconds; using 10000"
                    ));
                    DEFAULT_TIMEOUT
                }
            },
            None => DEFAULT_TIMEOUT,
        };
        let gzip = match get("COMPRESSION") {
            Some((var, v)) => match v.to_ascii_lowercase().as_str() {
                "gzip" => true,
                "none" => false,
                _ => {
                    warnings.push(format!(
                        "{var}={v:?}: only gzip and none are supported; sending uncompressed"
                    ));
                    false
                }
            },
            None => false,
        };
        let insecure = get("INSECURE").is_some_and(|(_, v)| v.eq_ignore_ascii_case("true"));
        let ca_file = get("CERTIFICATE").map(|(_, v)| PathBuf::from(v));
        let url = with_scheme(&target.url, target.protocol, insecure);
        (
            Self {
                protocol: target.protocol,
                url,
                headers,
                timeout,
                gzip,
                ca_file,
            },
            warnings,
        )
    }
}

/// `host:4317` has no scheme: gRPC then uses TLS unless `..._INSECURE=true` (the spec's
/// rule); http/protobuf endpoints without a scheme are taken as plain http.
fn with_scheme(url: &str, protocol: OtlpProtocol, insecure: bool) -> String {
    if url.starts_with("http://") || url.starts_with("https://") {
        return url.to_string();
    }
    let scheme = match protocol {
        OtlpProtocol::Grpc if !insecure => "https",
        _ => "http",
    };
    format!("{scheme}://{url}")
}

fn header_pair(entry: &str) -> Option<(String, String)> {
    let (k, v) = entry.split_once('=')?;
    let k = k.trim();
    if k.is_empty() {
        return None;
    }
    let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy();
    Some((k.to_ascii_lowercase(), v.into_owned()))
}

/// `k1=v1,k2=v2` with percent-encoded values (the W3C baggage-like format of the spec):
/// the well-formed entries, and the first entry that is not `key=value`, if any.
fn parse_headers(s: &str) -> (Vec<(String, String)>, Option<String>) {
    let mut first_bad = None;
    let pairs = s
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .filter_map(|e| {
            let pair = header_pair(e);
            if pair.is_none() && first_bad.is_none() {
                first_bad = Some(e.trim().to_string());
            }
            pair
        })
        .collect();
    (pairs, first_bad)
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the collector answered gRPC status {code:?}: {message}")]
    Grpc { code: Code, message: String },
    #[error("the collector answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("could not reach the collector: {0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("bad exporter setting: {0}")]
    Config(String),
}

impl ExportError {
    /// Whether sending the same data again may succeed (the OTLP spec's lists; a
    /// collector that is down or overloaded is retried, one that rejects the data is not).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Grpc { code, .. } => matches!(
                code,
                Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::OutOfRange
                    | Code::Unavailable
                    | Code::DataLoss
            ),
            Self::Http { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            Self::Transport(_) | Self::Timeout(_) => true,
            Self::Config(_) => false,
        }
    }
}

/// What the collector said about an accepted export (OTLP partial success).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Spans or data points the collector says it dropped.
    pub rejected: u64,
    pub message: String,
}

/// Decodes the `partial_success` of an Export*ServiceResponse: the trace and metrics
/// responses share the layout (field 1: PartialSuccess { 1: rejected count, 2: message }).
fn partial_success(body: &[u8]) -> Accepted {
    let mut out = Accepted::default();
    // A malformed answer is no failure: the export itself succeeded.
    let _ = read_partial_success(body, &mut out);
    out
}

fn read_partial_success(mut buf: &[u8], out: &mut Accepted) -> Option<()> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    while buf.has_remaining() {
        let (tag, wt) = decode_key(&mut buf).ok()?;
        if (tag, wt) != (1, WireType::LengthDelimited) {
            skip_field(wt, tag, &mut buf, DecodeContext::default()).ok()?;
            continue;
        }
        let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
        let mut inner = buf.get(..len)?;
        buf = &buf[len..];
        while inner.has_remaining() {
            let (tag, wt) = decode_key(&mut inner).ok()?;
            match (tag, wt) {
                (1, WireType::Varint) => out.rejected = decode_varint(&mut inner).ok()?,
                (2, WireType::LengthDelimited) => {
                    let n = usize::try_from(decode_varint(&mut inner).ok()?).ok()?;
                    out.message = String::from_utf8_lossy(inner.get(..n)?).into_owned();
                    inner = &inner[n..];
                }
                _ => skip_field(wt, tag, &mut inner, DecodeContext::default()).ok()?,
            }
        }
    }
    Some(())
}

/// Sends protobuf bodies unchanged and hands back the response bytes.
#[derive(Debug, Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self::Encoder {
        *self
    }
    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for BytesCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

enum Transport {
    Grpc {
        channel: Channel,
        path: PathAndQuery,
        metadata: Vec<(
            MetadataKey<tonic::metadata::Ascii>,
            MetadataValue<tonic::metadata::Ascii>,
        )>,
    },
    Http {
        client: reqwest::Client,
        headers: reqwest::header::HeaderMap,
    },
}

/// One signal's connection to the collector. Cheap to share: exports may run concurrently.
pub struct OtlpClient {
    transport: Transport,
    settings: ClientSettings,
}

impl OtlpClient {
    /// Builds the client; gRPC connects lazily, so a collector that is not up yet is no
    /// error here. Call inside the tokio runtime.
    pub fn new(settings: ClientSettings, signal: Signal) -> anyhow::Result<Self> {
        use anyhow::Context;
        let ca = match &settings.ca_file {
            Some(p) => Some(std::fs::read(p).with_context(|| {
                format!(
                    "reading the collector's CA certificate {} (OTEL_EXPORTER_OTLP_CERTIFICATE)",
                    p.display()
                )
            })?),
            None => None,
        };
        let transport = match settings.protocol {
            OtlpProtocol::Grpc => {
                let mut ep = Endpoint::from_shared(settings.url.clone())
                    .with_context(|| {
                        format!("{:?} is not a valid gRPC endpoint URL", settings.url)
                    })?
                    .connect_timeout(Duration::from_secs(5));
                if settings.url.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new().with_enabled_roots();
                    if let Some(pem) = &ca {
                        tls = tls.ca_certificate(Certificate::from_pem(pem));
                    }
                    ep = ep
                        .tls_config(tls)
                        .context("setting up TLS for the gRPC exporter")?;
                }
                let mut metadata = Vec::new();
                for (k, v) in &settings.headers {
                    let key = MetadataKey::from_bytes(k.as_bytes()).with_context(|| {
                        format!(
                            "{k:?} is not a valid gRPC header name (OTEL_EXPORTER_OTLP_HEADERS)"
                        )
                    })?;
                    let val = MetadataValue::try_from(v.as_str()).with_context(|| {
                        format!("the value of header {k:?} is not valid in gRPC metadata")
                    })?;
                    metadata.push((key, val));
                }
                Transport::Grpc {
                    channel: ep.connect_with_connector_lazy(CoalescingConnector::new()),
                    path: PathAndQuery::from_static(signal.grpc_path()),
                    metadata,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                let mut b = reqwest::Client::builder().timeout(settings.timeout);
                if let Some(pem) = &ca {
                    let cert = reqwest::Certificate::from_pem(pem).context(
                        "parsing the collector's CA certificate (OTEL_EXPORTER_OTLP_CERTIFICATE)",
                    )?;
                    b = b.add_root_certificate(cert);
                }
                let client = b.build().context("building the HTTP client")?;
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(
                    reqwest::header::CONTENT_TYPE,
                    reqwest::header::HeaderValue::from_static("application/x-protobuf"),
                );
                if settings.gzip {
                    headers.insert(
                        reqwest::header::CONTENT_ENCODING,
                        reqwest::header::HeaderValue::from_static("gzip"),
                    );
                }
                for (k, v) in &settings.headers {
                    let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .with_context(|| format!("{k:?} is not a valid HTTP header name (OTEL_EXPORTER_OTLP_HEADERS)"))?;
                    let val = reqwest::header::HeaderValue::from_str(v).with_context(|| {
                        format!("the value of header {k:?} is not a valid HTTP header value")
                    })?;
                    headers.insert(name, val);
                }
                Transport::Http { client, headers }
            }
        };
        Ok(Self {
            transport,
            settings,
        })
    }

    pub fn url(&self) -> &str {
        &self.settings.url
    }

    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// Sends one Export request body (an encoded `Export{Trace,Metrics}ServiceRequest`).
    pub async fn export(&self, body: Vec<u8>) -> Result<Accepted, ExportError> {
        let timeout = self.settings.timeout;
        match tokio::time::timeout(timeout, self.send(body)).await {
            Ok(r) => r,
            Err(_) => Err(ExportError::Timeout(timeout)),
        }
    }

    async fn send(&self, body: Vec<u8>) -> Result<Accepted, ExportError> {
        match &self.transport {
            Transport::Grpc {
                channel,
                path,
                metadata,
            } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone())
                    .accept_compressed(CompressionEncoding::Gzip);
                if self.settings.gzip {
                    grpc = grpc.send_compressed(CompressionEncoding::Gzip);
                }
                grpc.ready()
                    .await
                    .map_err(|e| ExportError::Transport(error_chain(&e)))?;
                let mut req = tonic::Request::new(body);
                req.set_timeout(self.settings.timeout);
                for (k, v) in metadata {
                    req.metadata_mut().insert(k.clone(), v.clone());
                }
                match grpc.unary(req, path.clone(), BytesCodec).await {
                    Ok(resp) => Ok(partial_success(resp.get_ref())),
                    Err(status) => Err(grpc_error(status)),
                }
            }
            Transport::Http { client, headers } => {
                let body = if self.settings.gzip {
                    gzip(&body).map_err(|e| ExportError::Config(format!("gzip: {e}")))?
                } else {
                    body
                };
                let resp = client
                    .post(&self.settings.url)
                    .headers(headers.clone())
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| {
                        if e.is_timeout() {
                            ExportError::Timeout(self.settings.timeout)
                        } else {
                            ExportError::Transport(error_chain(&e))
                        }
                    })?;
                let status = resp.status().as_u16();
                let bytes = resp.bytes().await.unwrap_or_default();
                if (200..300).contains(&status) {
                    Ok(partial_success(&bytes))
                } else {
                    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
                    Err(ExportError::Http { status, body: text })
                }
            }
        }
    }
}

/// A tonic transport error says little at the top ("transport error"); the cause
/// ("connection refused") is what a user needs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

fn grpc_error(status: Status) -> ExportError {
    // Connection failures surface as Unavailable with the cause in the source chain.
    let message = match std::error::Error::source(&status) {
        Some(src) => format!("{}: {}", status.message(), error_chain(src)),
        None => status.message().to_string(),
    };
    ExportError::Grpc {
        code: status.code(),
        message,
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(
        pairs: &[(&str, &str)],
        protocol: OtlpProtocol,
        url: &str,
    ) -> (ClientSettings, Vec<String>) {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let t = Target {
            protocol,
            explicit_endpoint: None,
            url: url.to_string(),
        };
        ClientSettings::resolve(&t, Signal::Traces, &move |k| m.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let (s, w) = settings(&[], OtlpProtocol::Grpc, "http://localhost:4317");
        assert!(w.is_empty());
        assert_eq!(s.url, "http://localhost:4317");
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert!(!s.gzip && s.headers.is_empty() && s.ca_file.is_none());
    }

    #[test]
    fn signal_variable_wins_and_values_are_decoded() {
        let (s, w) = settings(
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                    "Api-Key=s%20e%3Dcret, x-tenant = t1",
                ),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "GZIP"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
            ],
            OtlpProtocol::HttpProtobuf,
            "http://c:4318/v1/traces",
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            s.headers,
            vec![
                ("api-key".into(), "s e=cret".into()),
                ("x-tenant".into(), "t1".into())
            ]
        );
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert!(s.gzip);
        assert_eq!(s.ca_file, Some(PathBuf::from("/etc/ca.pem")));
    }

    #[test]
    fn bad_values_warn_and_fall_back() {
        let (s, w) = settings(
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "good=1,justakey,=v"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ],
            OtlpProtocol::Grpc,
            "http://c:4317",
        );
        assert_eq!(s.headers, vec![("good".into(), "1".into())]);
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert!(!s.gzip);
        assert_eq!(w.len(), 3, "{w:?}");
    }

    #[test]
    fn scheme_less_grpc_endpoint_is_tls_unless_insecure() {
        let (s, _) = settings(&[], OtlpProtocol::Grpc, "collector:4317");
        assert_eq!(s.url, "https://collector:4317");
        let (s, _) = settings(
            &[("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true")],
            OtlpProtocol::Grpc,
            "collector:4317",
        );
        assert_eq!(s.url, "http://collector:4317");
        let (s, _) = settings(&[], OtlpProtocol::HttpProtobuf, "collector:4318/v1/traces");
        assert_eq!(s.url, "http://collector:4318/v1/traces");
    }

    #[test]
    fn retryable_follows_the_spec() {
        let g = |code| {
            ExportError::Grpc {
                code,
                message: String::new(),
            }
            .retryable()
        };
        assert!(g(Code::Unavailable) && g(Code::ResourceExhausted) && g(Code::DeadlineExceeded));
        assert!(!g(Code::InvalidArgument) && !g(Code::Unauthenticated) && !g(Code::Unimplemented));
        let h = |status| {
            ExportError::Http {
                status,
                body: String::new(),
            }
            .retryable()
        };
        assert!(h(429) && h(503) && h(502) && h(504));
        assert!(!h(400) && !h(401) && !h(404) && !h(500));
        assert!(ExportError::Transport("refused".into()).retryable());
    }

    #[test]
    fn partial_success_is_read_from_either_response() {
        // ExportTraceServiceResponse { partial_success { rejected_spans: 3, error_message: "full" } }
        let body = [0x0a, 0x08, 0x08, 0x03, 0x12, 0x04, b'f', b'u', b'l', b'l'];
        assert_eq!(
            partial_success(&body),
            Accepted {
                rejected: 3,
                message: "full".into()
            }
        );
        assert_eq!(partial_success(&[]), Accepted::default());
        // Truncated and garbage bodies are no error: the export itself succeeded.
        let _ = partial_success(&body[..5]);
        let _ = partial_success(&[0xff; 16]);
    }

    #[test]
    fn partial_success_never_panics_on_random_bytes() {
        use proptest::prelude::*;
        proptest!(|(body in proptest::collection::vec(any::<u8>(), 0..64))| {
            let _ = partial_success(&body);
        });
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let body = vec![7u8; 10_000];
        let z = gzip(&body).unwrap();
        assert!(z.len() < body.len() / 10);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&z[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, body);
    }
}
