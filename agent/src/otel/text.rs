//! Short text formatted on the stack (IP addresses, status codes): the span encoder and
//! the metrics hot path must not allocate.
use std::{fmt, net::IpAddr};

/// Short text on the stack: IP addresses and status codes, formatted without allocating.
/// 48 bytes: the longest `IpAddr` text (an IPv4-mapped IPv6 address) is 45.
pub struct StackText {
    buf: [u8; 48],
    len: usize,
}

impl StackText {
    pub fn empty() -> Self {
        Self {
            buf: [0; 48],
            len: 0,
        }
    }

    /// What `IpAddr`'s `Display` writes (what `build_span` reports).
    pub fn ip(ip: IpAddr) -> Self {
        let mut t = Self::empty();
        match ip {
            IpAddr::V4(v4) => {
                for (i, o) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.byte(b'.');
                    }
                    // Decimal without leading zeros, as `Display`.
                    if o >= 100 {
                        t.byte(b'0' + o / 100);
                    }
                    if o >= 10 {
                        t.byte(b'0' + o / 10 % 10);
                    }
                    t.byte(b'0' + o % 10);
                }
            }
            // IPv6 text has subtle rules (longest zero run, IPv4-mapped forms): std's own.
            // At most 39 characters (45 for a mapped form), so it always fits.
            IpAddr::V6(v6) => {
                let _ = fmt::Write::write_fmt(&mut t, format_args!("{v6}"));
            }
        }
        t
    }

    /// `s`, a short name (gRPC's status names); empty if it is over 48 bytes.
    pub fn str(s: &str) -> Self {
        let mut t = Self::empty();
        let _ = fmt::Write::write_str(&mut t, s);
        t
    }

    pub fn decimal(v: u16) -> Self {
        let mut t = Self::empty();
        t.decimal_into(v);
        t
    }

    // Byte by byte: these are a few bytes, where a slice copy is a memcpy call.
    #[inline]
    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    fn decimal_into(&mut self, mut v: u16) {
        let mut digits = [0u8; 5];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            self.byte(d);
        }
    }

    /// ASCII: only digits, dots, `Display`'s IPv6 text and gRPC status names are written.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn ips_and_decimals_read_as_display_writes_them() {
        for ip in [
            IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
            IpAddr::V4(Ipv4Addr::new(10, 200, 3, 99)),
            IpAddr::V4(Ipv4Addr::BROADCAST),
            IpAddr::V6(Ipv6Addr::new(
                0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
            )),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0xffff, 0xffff)),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0xffff, 0xffff)),
        ] {
            assert_eq!(StackText::ip(ip).as_bytes(), ip.to_string().as_bytes());
        }
        for o in 0..=255u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(o, 0, 255 - o, o / 3));
            assert_eq!(StackText::ip(ip).as_bytes(), ip.to_string().as_bytes());
        }
        for v in [0, 7, 10, 99, 100, 404, 9999, 10000, 65535] {
            assert_eq!(StackText::decimal(v).as_bytes(), v.to_string().as_bytes());
        }
    }
}
