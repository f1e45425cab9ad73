//! TEMPORARY shim (replaced by the hand-written encoder from branch `wire`): encodes
//! through SpanData and opentelemetry-proto, exactly as the SDK exporter did.
use opentelemetry_proto::tonic::{
    common::v1::InstrumentationScope as PScope, resource::v1::Resource as PResource,
    trace::v1::Span as PSpan,
};
use prost::Message;

use super::span::{build_span, scope, SpanIds};
use crate::exchange::CapturedExchange;

pub fn encode_span(out: &mut Vec<u8>, ex: &CapturedExchange, ids: &SpanIds, route: Option<&str>) {
    let data = build_span(ex, ids, route, &scope());
    let _ = PSpan::from(data).encode(out);
}

pub fn encode_resource(out: &mut Vec<u8>, resource: &opentelemetry_sdk::Resource) {
    let r =
        opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema::from(resource);
    let _ = PResource {
        attributes: r.attributes.0,
        dropped_attributes_count: 0,
        entity_refs: vec![],
    }
    .encode(out);
}

pub fn encode_scope(out: &mut Vec<u8>, s: &opentelemetry::InstrumentationScope) {
    let _ = PScope::from((s.clone(), None)).encode(out);
}

pub struct TraceRequest {
    scope: Vec<u8>,
    out: Vec<u8>,
}

fn put_len_field(out: &mut Vec<u8>, tag: u32, len: usize) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(len as u64, out);
}

impl TraceRequest {
    pub fn new(scope_bytes: Vec<u8>) -> Self {
        Self {
            scope: scope_bytes,
            out: Vec::new(),
        }
    }
    pub fn add_group<'a>(
        &mut self,
        resource_bytes: &[u8],
        spans: impl IntoIterator<Item = &'a [u8]>,
    ) {
        let mut ss = Vec::new();
        put_len_field(&mut ss, 1, self.scope.len());
        ss.extend_from_slice(&self.scope);
        for s in spans {
            put_len_field(&mut ss, 2, s.len());
            ss.extend_from_slice(s);
        }
        let mut rs = Vec::new();
        put_len_field(&mut rs, 1, resource_bytes.len());
        rs.extend_from_slice(resource_bytes);
        put_len_field(&mut rs, 2, ss.len());
        rs.extend_from_slice(&ss);
        put_len_field(&mut self.out, 1, rs.len());
        self.out.extend_from_slice(&rs);
    }
    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}
