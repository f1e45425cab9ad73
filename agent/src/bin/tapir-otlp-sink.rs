//! `tapir-otlp-sink`: the counting OTLP receiver of `cargo xtask bench`.
//!
//! A real receiver — OTLP/gRPC (HTTP/2, gRPC framing) and OTLP/HTTP (HTTP/1.1, binary
//! protobuf), the official protobuf messages of `opentelemetry-proto` decoded — that counts what it receives instead of keeping
//! it. The benchmark runs it on the same two cores as nginx, wrk and the agent, so what it
//! spends per span is taken from the measured processes: the Python receiver of the tests
//! spent more CPU per request than the agent itself and dominated the latency figures.
//!
//! ```text
//! tapir-otlp-sink [--grpc-port N] [--http-port N]
//! ```
//!
//! prints `listening GRPC_PORT HTTP_PORT` once serving; then each line `stats` on stdin is answered
//! with one JSON line of counters; end of stdin stops it.
use std::{
    io::{BufRead, Read, Write},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest},
    metrics::v1::metric::Data,
};
use prost::Message;

const TRACES: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const METRICS: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
/// The OTLP/HTTP paths of the same two services.
const HTTP_TRACES: &str = "/v1/traces";
const HTTP_METRICS: &str = "/v1/metrics";

/// gRPC status codes this receiver answers with.
const GRPC_OK: &str = "0";
const GRPC_INVALID_ARGUMENT: &str = "3";
const GRPC_UNIMPLEMENTED: &str = "12";
const GRPC_INTERNAL: &str = "13";

/// One trace request in this many is decoded in full (see `Counts::record`).
const FULL_DECODE_EVERY: u64 = 64;

#[derive(Parser)]
#[command(about = "Counting OTLP receiver (gRPC and HTTP/protobuf) for `cargo xtask bench`")]
struct Cli {
    /// OTLP/gRPC port, on 127.0.0.1 (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    grpc_port: u16,
    /// OTLP/HTTP (binary protobuf) port, on 127.0.0.1 (0: any free port; printed too).
    #[arg(long, default_value_t = 0)]
    http_port: u16,
}

#[derive(Default)]
struct Counts {
    spans: AtomicU64,
    metric_points: AtomicU64,
    exports: AtomicU64,
    errors: AtomicU64,
    trace_requests: AtomicU64,
}

impl Counts {
    fn json(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            r#"{{"spans":{},"metric_points":{},"exports":{},"errors":{}}}"#,
            g(&self.spans),
            g(&self.metric_points),
            g(&self.exports),
            g(&self.errors)
        )
    }

    /// Decodes one export request and counts its items; `Err` is the gRPC status to send.
    fn record(&self, path: &str, message: &[u8]) -> Result<(), &'static str> {
        let bad = |_| GRPC_INVALID_ARGUMENT;
        let (counter, n) = match path {
            TRACES => {
                let n = count_spans(message).ok_or(GRPC_INVALID_ARGUMENT)?;
                // Every 64th request (and the first) is also decoded in full by prost, and
                // the two counts must agree: the walk checks the wire format only.
                let seen = self.trace_requests.fetch_add(1, Ordering::Relaxed);
                if seen.is_multiple_of(FULL_DECODE_EVERY) {
                    let req = ExportTraceServiceRequest::decode(message).map_err(bad)?;
                    let decoded = req
                        .resource_spans
                        .iter()
                        .flat_map(|rs| &rs.scope_spans)
                        .map(|ss| ss.spans.len())
                        .sum::<usize>();
                    if decoded != n {
                        return Err(GRPC_INTERNAL);
                    }
                }
                (&self.spans, n)
            }
            METRICS => {
                let req = ExportMetricsServiceRequest::decode(message).map_err(bad)?;
                let n = req
                    .resource_metrics
                    .iter()
                    .flat_map(|rm| &rm.scope_metrics)
                    .flat_map(|sm| &sm.metrics)
                    .map(|m| match &m.data {
                        Some(Data::Gauge(d)) => d.data_points.len(),
                        Some(Data::Sum(d)) => d.data_points.len(),
                        Some(Data::Histogram(d)) => d.data_points.len(),
                        Some(Data::ExponentialHistogram(d)) => d.data_points.len(),
                        Some(Data::Summary(d)) => d.data_points.len(),
                        None => 0,
                    })
                    .sum::<usize>();
                (&self.metric_points, n)
            }
            _ => return Err(GRPC_UNIMPLEMENTED),
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.exports.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The fields of one protobuf message: (field number, wire type, length-delimited payload).
/// `None` for malformed input. Scalars are skipped (their payload is empty).
fn fields(mut buf: &[u8]) -> impl Iterator<Item = Option<(u64, u8, &[u8])>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let mut next = || -> Option<(u64, u8, &[u8])> {
            let key = prost::encoding::decode_varint(&mut buf).ok()?;
            let wire_type = (key & 7) as u8;
            let skip = match wire_type {
                0 => {
                    prost::encoding::decode_varint(&mut buf).ok()?;
                    0
                }
                1 => 8,
                2 => usize::try_from(prost::encoding::decode_varint(&mut buf).ok()?).ok()?,
                5 => 4,
                _ => return None,
            };
            let payload = buf.get(..skip)?;
            buf = &buf[skip..];
            Some((
                key >> 3,
                wire_type,
                if wire_type == 2 { payload } else { &[] },
            ))
        };
        let field = next();
        if field.is_none() {
            buf = &[]; // stop after reporting the error
        }
        Some(field)
    })
}

/// The sub-messages numbered `number` of `msg`.
fn submessages(msg: &[u8], number: u64) -> impl Iterator<Item = Option<&[u8]>> {
    fields(msg).filter_map(move |f| match f {
        None => Some(None),
        Some((n, 2, payload)) if n == number => Some(Some(payload)),
        Some(_) => None,
    })
}

/// Spans in an ExportTraceServiceRequest (resource_spans = 1 → scope_spans = 2 → spans =
/// 2), walking the wire format without building the messages.
fn count_spans(request: &[u8]) -> Option<usize> {
    let mut n = 0;
    for resource_spans in submessages(request, 1) {
        for scope_spans in submessages(resource_spans?, 2) {
            for span in submessages(scope_spans?, 2) {
                span?;
                n += 1;
            }
        }
    }
    Some(n)
}

fn gunzip(packed: &[u8]) -> std::io::Result<Bytes> {
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(packed).read_to_end(&mut inflated)?;
    Ok(inflated.into())
}

/// Splits a gRPC request body into its length-prefixed messages, inflating gzip ones.
fn grpc_messages(mut body: Bytes, gzip: bool) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    while body.has_remaining() {
        if body.remaining() < 5 {
            bail!("truncated gRPC frame header");
        }
        let compressed = body.get_u8() != 0;
        let len = body.get_u32() as usize;
        if body.remaining() < len {
            bail!("gRPC frame of {len} bytes, {} left", body.remaining());
        }
        let frame = body.split_to(len);
        if compressed {
            if !gzip {
                bail!("compressed frame without grpc-encoding: gzip");
            }
            out.push(gunzip(&frame).context("gunzip")?);
        } else {
            out.push(frame);
        }
    }
    Ok(out)
}

async fn serve_request(
    counts: Arc<Counts>,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<()> {
    let (parts, mut body) = request.into_parts();
    let gzip = parts
        .headers
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    let status = match grpc_messages(buf.freeze(), gzip) {
        Ok(messages) => messages
            .iter()
            .try_for_each(|m| counts.record(parts.uri.path(), m))
            .err()
            .unwrap_or(GRPC_OK),
        Err(_) => GRPC_INVALID_ARGUMENT,
    };
    if status != GRPC_OK {
        counts.errors.fetch_add(1, Ordering::Relaxed);
    }
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())?;
    let mut send = respond.send_response(response, false)?;
    if status == GRPC_OK {
        // Every Export*ServiceResponse without partial_success encodes to zero bytes.
        send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false)?;
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static(status));
    send.send_trailers(trailers)?;
    Ok(())
}

const SINK_WINDOW: u32 = 4 << 20;

async fn serve_connection(counts: Arc<Counts>, socket: tokio::net::TcpStream) -> Result<()> {
    let _ = socket.set_nodelay(true);
    // Flow-control windows of a warmed-up collector: grpc-go (the OTel Collector) grows its
    // windows from 64 KiB by BDP estimation up to 16 MiB, so a 512-span export (~150 KiB)
    // goes out in one flight there. h2's fixed 64 KiB default would instead make every
    // export wait for WINDOW_UPDATEs, charging the agent round trips a collector does not.
    let mut conn = h2::server::Builder::new()
        .initial_window_size(SINK_WINDOW)
        .initial_connection_window_size(SINK_WINDOW)
        .handshake(socket)
        .await?;
    while let Some(accepted) = conn.accept().await {
        let (request, respond) = accepted?;
        let counts = counts.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_request(counts.clone(), request, respond).await {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("tapir-otlp-sink: request: {e:#}");
            }
        });
    }
    Ok(())
}

/// The gRPC status of `Counts::record` as an OTLP/HTTP status code.
fn http_status(grpc: &str) -> u16 {
    match grpc {
        GRPC_OK => 200,
        GRPC_INVALID_ARGUMENT => 400,
        GRPC_UNIMPLEMENTED => 404,
        _ => 500,
    }
}

/// One OTLP/HTTP request: `POST /v1/traces` or `/v1/metrics`, binary protobuf, gzip or not.
/// Answers with an empty Export*ServiceResponse (all accepted) or the error's status.
async fn serve_http_request(
    counts: Arc<Counts>,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<http_body_util::Full<Bytes>>> {
    use http_body_util::BodyExt;
    let (parts, body) = request.into_parts();
    let gzip = parts
        .headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let protobuf = parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
    let body = body.collect().await?.to_bytes();
    let status = match (parts.method == http::Method::POST, protobuf) {
        (false, _) => 405,
        (true, false) => 415,
        (true, true) => {
            let path = match parts.uri.path() {
                HTTP_TRACES => TRACES,
                HTTP_METRICS => METRICS,
                other => other,
            };
            let message = if gzip { gunzip(&body).ok() } else { Some(body) };
            match message {
                Some(m) => http_status(counts.record(path, &m).err().unwrap_or(GRPC_OK)),
                None => 400,
            }
        }
    };
    if status != 200 {
        counts.errors.fetch_add(1, Ordering::Relaxed);
    }
    Ok(http::Response::builder()
        .status(status)
        .header("content-type", "application/x-protobuf")
        .body(http_body_util::Full::new(Bytes::new()))?)
}

async fn serve_http_connection(counts: Arc<Counts>, socket: tokio::net::TcpStream) -> Result<()> {
    let _ = socket.set_nodelay(true);
    let service =
        hyper::service::service_fn(move |request| serve_http_request(counts.clone(), request));
    hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
        .await?;
    Ok(())
}

/// Accepts connections on `listener` forever, serving each with `serve`.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    counts: Arc<Counts>,
    serve: F,
) -> Result<()>
where
    F: Fn(Arc<Counts>, tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    loop {
        let (socket, _) = listener.accept().await?;
        let connection = serve(counts.clone(), socket);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("tapir-otlp-sink: connection: {e:#}");
            }
        });
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let counts = Arc::new(Counts::default());
    // One thread: the receiver shares the benchmark's two cores with what it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bind = |port: u16| {
        rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .with_context(|| format!("binding 127.0.0.1:{port}"))
    };
    let (grpc, http) = (bind(cli.grpc_port)?, bind(cli.http_port)?);
    println!(
        "listening {} {}",
        grpc.local_addr()?.port(),
        http.local_addr()?.port()
    );
    std::io::stdout().flush()?;

    let stats = counts.clone();
    std::thread::spawn(move || {
        let stdout = std::io::stdout();
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim() == "stats" {
                let mut out = stdout.lock();
                let _ = writeln!(out, "{}", stats.json());
                let _ = out.flush();
            }
        }
        std::process::exit(0);
    });

    let http_counts = counts.clone();
    rt.spawn(async move {
        if let Err(e) = accept_loop(http, http_counts, serve_http_connection).await {
            eprintln!("tapir-otlp-sink: OTLP/HTTP listener: {e:#}");
        }
    });
    rt.block_on(accept_loop(grpc, counts, serve_connection))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };

    use super::*;

    fn request(resources: usize, scopes: usize, spans: usize) -> Vec<u8> {
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "GET /".into(),
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: (0..resources)
                .map(|_| ResourceSpans {
                    resource: Some(Resource::default()),
                    scope_spans: (0..scopes)
                        .map(|_| ScopeSpans {
                            spans: vec![span.clone(); spans],
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
        }
        .encode_to_vec()
    }

    #[test]
    fn spans_are_counted_like_prost_decodes_them() {
        assert_eq!(count_spans(&request(2, 3, 5)), Some(30));
        assert_eq!(count_spans(&request(1, 1, 0)), Some(0));
        assert_eq!(count_spans(&[]), Some(0));
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        let full = request(2, 2, 4);
        for cut in 1..full.len() {
            // A cut request either fails or holds fewer spans; it never reads past the end.
            if let Some(n) = count_spans(&full[..cut]) {
                assert!(n < 16, "cut at {cut}: {n}");
            }
        }
        assert_eq!(count_spans(&[0x0f]), None, "wire type 7");
        assert_eq!(count_spans(&[0x0a, 0xff]), None, "truncated length");
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = count_spans(&bytes);
        }
    }

    #[test]
    fn grpc_frames_split_and_inflate() {
        let msg = request(1, 1, 2);
        let mut body = vec![0];
        body.extend((msg.len() as u32).to_be_bytes());
        body.extend(&msg);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&msg).unwrap();
        let packed = gz.finish().unwrap();
        body.push(1);
        body.extend((packed.len() as u32).to_be_bytes());
        body.extend(&packed);
        let frames = grpc_messages(Bytes::from(body.clone()), true).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f[..] == msg[..]));
        assert!(grpc_messages(Bytes::from(body.clone()), false).is_err());
        assert!(grpc_messages(Bytes::from(body[..body.len() - 1].to_vec()), true).is_err());
        assert!(grpc_messages(Bytes::from_static(&[0, 0, 0]), true).is_err());
    }

    /// Sends `head` + `body` over a real connection to the OTLP/HTTP side; returns the
    /// response's status line.
    fn http_exchange(counts: &Arc<Counts>, head: String, body: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(accept_loop(listener, counts.clone(), serve_http_connection));
            let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            client.write_all(head.as_bytes()).await.unwrap();
            client.write_all(body).await.unwrap();
            let mut response = Vec::new();
            client.read_to_end(&mut response).await.unwrap();
            let response = String::from_utf8_lossy(&response).into_owned();
            response.lines().next().unwrap_or_default().to_string()
        })
    }

    fn post(path: &str, content_type: &str, extra: &str, body: &[u8]) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nHost: sink\r\nContent-Type: {content_type}\r\n{extra}\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
    }

    #[test]
    fn otlp_http_requests_are_counted_like_grpc_ones() {
        let counts = Arc::new(Counts::default());
        let plain = request(1, 1, 3);
        let status = http_exchange(
            &counts,
            post(HTTP_TRACES, "application/x-protobuf", "", &plain),
            &plain,
        );
        assert_eq!(status, "HTTP/1.1 200 OK");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&request(2, 1, 2)).unwrap();
        let packed = gz.finish().unwrap();
        let head = post(
            HTTP_TRACES,
            "application/x-protobuf",
            "Content-Encoding: gzip\r\n",
            &packed,
        );
        assert_eq!(http_exchange(&counts, head, &packed), "HTTP/1.1 200 OK");
        assert_eq!(
            counts.json(),
            r#"{"spans":7,"metric_points":0,"exports":2,"errors":0}"#
        );
        // JSON is not served; an unknown path and a malformed body are errors.
        let head = post(HTTP_TRACES, "application/json", "", b"{}");
        assert_eq!(
            http_exchange(&counts, head, b"{}"),
            "HTTP/1.1 415 Unsupported Media Type"
        );
        let head = post("/v1/logs", "application/x-protobuf", "", &plain);
        assert_eq!(
            http_exchange(&counts, head, &plain),
            "HTTP/1.1 404 Not Found"
        );
        let bad = [0x0a, 0xff];
        let head = post(HTTP_TRACES, "application/x-protobuf", "", &bad);
        assert_eq!(
            http_exchange(&counts, head, &bad),
            "HTTP/1.1 400 Bad Request"
        );
        assert_eq!(
            counts.json(),
            r#"{"spans":7,"metric_points":0,"exports":2,"errors":3}"#
        );
    }

    #[test]
    fn counts_by_service() {
        let counts = Counts::default();
        assert_eq!(counts.record(TRACES, &request(1, 2, 3)), Ok(()));
        assert_eq!(
            counts.record(TRACES, &[0x0a, 0xff]),
            Err(GRPC_INVALID_ARGUMENT)
        );
        assert_eq!(counts.record("/nope", &[]), Err(GRPC_UNIMPLEMENTED));
        assert_eq!(
            counts.json(),
            r#"{"spans":6,"metric_points":0,"exports":1,"errors":0}"#
        );
    }
}
