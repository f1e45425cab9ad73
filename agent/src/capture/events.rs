//! Typed views of the ring-buffer records defined in `agent_common`.
use agent_common::{ConnEvent, DataEventHeader, EventHeader, EventKind, MAX_CAPTURE, TAIL_BYTES};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent<'a> {
    ConnOpen(ConnEvent),
    ConnClose(ConnEvent),
    /// A connection that speaks TLS or HTTP/2 (`ConnEvent::protocol`): never read.
    ConnOpaque(ConnEvent),
    Data(DataEvent<'a>),
    ProcExit(EventHeader),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataEvent<'a> {
    pub header: DataEventHeader,
    /// The captured prefix of the bytes moved.
    pub payload: &'a [u8],
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("record of kind {kind:?} is {len} bytes, shorter than {need}")]
    Short {
        kind: EventKind,
        len: usize,
        need: usize,
    },
    #[error("data record claims {claimed} captured bytes but carries {carried}")]
    BadCaptureLength { claimed: usize, carried: usize },
}

fn read<T: Copy>(bytes: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            kind,
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked above; T is a plain-old-data repr(C) type from agent_common
    // (integers and byte arrays only), valid for any bit pattern; read_unaligned tolerates
    // any alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<KernelEvent<'_>, DecodeError> {
    let &tag = bytes.first().ok_or(DecodeError::Empty)?;
    let kind = EventKind::from_u8(tag).ok_or(DecodeError::UnknownKind(tag))?;
    Ok(match kind {
        EventKind::ConnOpen => KernelEvent::ConnOpen(read(bytes, kind)?),
        EventKind::ConnClose => KernelEvent::ConnClose(read(bytes, kind)?),
        EventKind::ConnOpaque => KernelEvent::ConnOpaque(read(bytes, kind)?),
        EventKind::ProcExit => KernelEvent::ProcExit(read(bytes, kind)?),
        EventKind::Data => {
            let header: DataEventHeader = read(bytes, kind)?;
            let body = &bytes[std::mem::size_of::<DataEventHeader>()..];
            let claimed = header.captured as usize;
            if claimed > MAX_CAPTURE || claimed > body.len() {
                return Err(DecodeError::BadCaptureLength {
                    claimed,
                    carried: body.len(),
                });
            }
            KernelEvent::Data(DataEvent {
                header,
                payload: &body[..claimed],
            })
        }
    })
}

impl DataEvent<'_> {
    /// The uncaptured end of the bytes moved (up to TAIL_BYTES), or empty.
    pub fn tail(&self) -> &[u8] {
        let n = (self.header.tail_len as usize).min(TAIL_BYTES);
        &self.header.tail[..n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{ConnTuple, DIR_EGRESS};

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of a repr(C) POD value.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn data_record(captured: u32, payload: &[u8]) -> Vec<u8> {
        let hdr = DataEventHeader {
            header: EventHeader {
                kind: EventKind::Data as u8,
                tgid: 42,
                ..Default::default()
            },
            total: 100,
            captured,
            direction: DIR_EGRESS,
            tail_len: 3,
            tail: *b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        let mut v = as_bytes(&hdr);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_a_data_record() {
        let rec = data_record(5, b"GET /");
        let KernelEvent::Data(d) = decode(&rec).unwrap() else {
            panic!("not data")
        };
        assert_eq!(d.payload, b"GET /");
        assert_eq!(d.header.header.tgid, 42);
        assert_eq!(d.tail(), b"abc");
    }

    #[test]
    fn decodes_conn_events() {
        let ev = ConnEvent {
            header: EventHeader {
                kind: EventKind::ConnOpen as u8,
                fd: 7,
                ..Default::default()
            },
            sock_id: 9,
            tuple: ConnTuple {
                local_port: 80,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(decode(&as_bytes(&ev)), Ok(KernelEvent::ConnOpen(ev)));
        let opaque = ConnEvent {
            header: EventHeader {
                kind: EventKind::ConnOpaque as u8,
                fd: 7,
                ..Default::default()
            },
            protocol: agent_common::OPAQUE_TLS,
            ..ev
        };
        assert_eq!(
            decode(&as_bytes(&opaque)),
            Ok(KernelEvent::ConnOpaque(opaque))
        );
        // Cut short: a counted malformed record, not a read past the end.
        let bytes = as_bytes(&opaque);
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(&[99, 0, 0]), Err(DecodeError::UnknownKind(99)));
        assert!(matches!(decode(&[1, 0, 0]), Err(DecodeError::Short { .. })));
        let rec = data_record(50, b"short");
        assert!(matches!(
            decode(&rec),
            Err(DecodeError::BadCaptureLength { .. })
        ));
        let rec = data_record(u32::MAX, b"x");
        assert!(matches!(
            decode(&rec),
            Err(DecodeError::BadCaptureLength { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = decode(&bytes);
        }
    }
}
