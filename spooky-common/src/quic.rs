//! The little of QUIC the kernel needs: long or short header, the fixed bit, the destination
//! connection ID, and whether a long-header packet is a client Initial (RFC 9000 §17, RFC 8999,
//! RFC 9369 for version 2). Invalid packets come back as the drop counter that names why.
//! Placing the DCID on a worker is `spooky_common::cid::place`, not here.

use crate::{cid::MAX_CID_LEN, maps::Counter};

use crate::packet::Bytes;

const HEADER_FORM_LONG: u8 = 0x80;
const FIXED_BIT: u8 = 0x40;
const LONG_TYPE_MASK: u8 = 0x30;
const QUIC_V1: u32 = 0x0000_0001;
const QUIC_V2: u32 = 0x6b33_43cf;
/// Long-header packet type bits of an Initial: 0b00 in v1, 0b01 in v2.
const INITIAL_TYPE_V1: u8 = 0x00;
const INITIAL_TYPE_V2: u8 = 0x10;
/// RFC 9000 §14.1: a client's UDP datagram carrying an Initial is at least 1200 bytes.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
/// First byte + version + DCID length byte.
const LONG_PREFIX_LEN: usize = 1 + 4 + 1;

/// Long or short header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Short,
    Long,
}

/// The parts of a QUIC header steering and the Initial rate limit need. No padding (`repr(C)`,
/// 32 bytes, every byte a field): the kernel program copies it whole, and the verifier
/// refuses a copy of a padding byte nobody wrote.
#[repr(C)]
pub struct QuicHeader {
    /// Length of `dcid` used.
    pub dcid_len: usize,
    pub form: Form,
    /// A long-header Initial (v1 or v2): what the Initial rate limit counts.
    pub initial: bool,
    /// A long header of a version that is neither 1 nor 2 (nor 0, Version Negotiation): held
    /// to an Initial's rules (1200 bytes, the rate limit), since it asks for Version
    /// Negotiation.
    pub unknown_version: bool,
    /// Always zero.
    pub reserved: u8,
    /// Destination connection ID, `dcid_len` bytes used.
    pub dcid: [u8; MAX_CID_LEN],
}
const _: () = assert!(core::mem::size_of::<QuicHeader>() == 32);

impl QuicHeader {
    /// The destination connection ID.
    #[inline(always)]
    pub fn dcid(&self) -> &[u8] {
        let len = self.dcid_len.min(MAX_CID_LEN);
        &self.dcid[..len]
    }
}

/// Every byte [`parse`] reads: first byte, version, DCID length, the longest DCID. A copy of
/// this many bytes of the UDP payload is enough to parse it.
pub const HEADER_BYTES: usize = LONG_PREFIX_LEN + MAX_CID_LEN;

/// Parses the QUIC header of a UDP payload of `payload_len` bytes at `offset` in `pkt`.
/// `short_dcid_len` is the length of our connection IDs (short headers carry no length).
/// The caller has dropped empty payloads: with `payload_len` 0 the first byte read would be
/// whatever follows the datagram in the frame. (Checking it here instead makes LLVM emit a
/// copy of an uninitialised register that the verifier refuses.)
///
/// # Errors
/// The drop counter naming why the packet is invalid: fixed bit clear, DCID length above 20,
/// client Initial in a datagram under 1200 bytes, header cut short.
#[inline(always)]
pub fn parse<B: Bytes + ?Sized>(
    pkt: &B,
    offset: usize,
    payload_len: usize,
    short_dcid_len: usize,
) -> Result<QuicHeader, Counter> {
    let first = pkt.byte(offset).ok_or(Counter::DropTruncated)?;
    if first & FIXED_BIT == 0 {
        return Err(Counter::DropFixedBit);
    }
    if first & HEADER_FORM_LONG == 0 {
        if short_dcid_len > MAX_CID_LEN || payload_len < 1 + short_dcid_len {
            return Err(Counter::DropTruncated);
        }
        let mut header = QuicHeader {
            form: Form::Short,
            initial: false,
            unknown_version: false,
            reserved: 0,
            dcid: [0; MAX_CID_LEN],
            dcid_len: 0,
        };
        copy_dcid(pkt, offset + 1, short_dcid_len, &mut header)?;
        return Ok(header);
    }
    if payload_len < LONG_PREFIX_LEN {
        return Err(Counter::DropTruncated);
    }
    let version: [u8; 4] = pkt.array(offset + 1).ok_or(Counter::DropTruncated)?;
    let version = u32::from_be_bytes(version);
    let dcid_len = usize::from(pkt.byte(offset + 5).ok_or(Counter::DropTruncated)?);
    if dcid_len > MAX_CID_LEN {
        return Err(Counter::DropDcidTooLong);
    }
    if payload_len < LONG_PREFIX_LEN + dcid_len {
        return Err(Counter::DropTruncated);
    }
    let initial = is_initial(version, first);
    let unknown_version = version != QUIC_V1 && version != QUIC_V2 && version != 0;
    // RFC 9000 §14.1 for Initials, §5.2.2 for unknown versions (no amplification).
    if (initial || unknown_version) && payload_len < MIN_INITIAL_DATAGRAM {
        return Err(Counter::DropShortInitial);
    }
    let mut header = QuicHeader {
        form: Form::Long,
        initial,
        unknown_version,
        reserved: 0,
        dcid: [0; MAX_CID_LEN],
        dcid_len: 0,
    };
    copy_dcid(pkt, offset + LONG_PREFIX_LEN, dcid_len, &mut header)?;
    Ok(header)
}

/// Whether a long header of `version` with first byte `first` is an Initial packet.
#[inline(always)]
fn is_initial(version: u32, first: u8) -> bool {
    let packet_type = first & LONG_TYPE_MASK;
    (version == QUIC_V1 && packet_type == INITIAL_TYPE_V1)
        || (version == QUIC_V2 && packet_type == INITIAL_TYPE_V2)
}

/// Copies `len` (at most [`MAX_CID_LEN`]) bytes at `offset` into `header.dcid`, one
/// bounds-checked byte at a time (a loop of at most 20 steps).
#[inline(always)]
fn copy_dcid<B: Bytes + ?Sized>(
    pkt: &B,
    offset: usize,
    len: usize,
    header: &mut QuicHeader,
) -> Result<(), Counter> {
    let mut i = 0;
    while i < MAX_CID_LEN {
        if i >= len {
            break;
        }
        header.dcid[i] = pkt.byte(offset + i).ok_or(Counter::DropTruncated)?;
        i += 1;
    }
    header.dcid_len = i;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Packet;

    /// A long-header packet: first byte, version, DCID, a zero-length SCID, zero padding.
    fn long(first: u8, version: u32, dcid: &[u8]) -> [u8; 1400] {
        let mut p = [0u8; 1400];
        p[0] = first;
        p[1..5].copy_from_slice(&version.to_be_bytes());
        p[5] = dcid.len() as u8;
        p[6..6 + dcid.len()].copy_from_slice(dcid);
        p
    }

    fn parse_bytes(bytes: &[u8], payload_len: usize) -> Result<QuicHeader, Counter> {
        parse(&Packet::over(bytes), 0, payload_len, 16)
    }

    #[test]
    fn headers_are_classified_as_the_kernel_program_sees_them() {
        let dcid = [7u8; 16];
        let mut short = [0u8; 40];
        short[0] = 0x40;
        short[1..17].copy_from_slice(&dcid);
        let h = parse_bytes(&short, 40).unwrap_or_else(|c| panic!("{}", c as u32));
        assert!(h.form == Form::Short && !h.initial && h.dcid() == dcid);

        let v1_initial = long(0xc0, QUIC_V1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let h = parse_bytes(&v1_initial, 1200).unwrap_or_else(|c| panic!("{}", c as u32));
        assert!(h.form == Form::Long && h.initial && h.dcid() == [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(!h.unknown_version);
        // Other versions ask for Version Negotiation: held to an Initial's size.
        let grease = long(0xc0, 0x1a2a_3a4a, &[1; 8]);
        assert!(parse_bytes(&grease, 1200).is_ok_and(|h| h.unknown_version && !h.initial));
        assert_eq!(
            parse_bytes(&grease, 1199).err().map(|c| c as u32),
            Some(Counter::DropShortInitial as u32)
        );
        // Version 2 Initials have type bits 0b01; 0b00 is 0-RTT there.
        let v2_initial = long(0xd0, QUIC_V2, &[9; 8]);
        assert!(parse_bytes(&v2_initial, 1200).is_ok_and(|h| h.initial));
        let v2_zero_rtt = long(0xc0, QUIC_V2, &[9; 8]);
        assert!(parse_bytes(&v2_zero_rtt, 1200).is_ok_and(|h| !h.initial));
        let handshake = long(0xe0, QUIC_V1, &[9; 8]);
        assert!(parse_bytes(&handshake, 100).is_ok_and(|h| !h.initial && !h.unknown_version));
    }

    /// The sk_reuseport program parses a copy of the first [`HEADER_BYTES`]: the same answer
    /// as parsing the packet itself.
    #[test]
    fn a_copy_of_the_first_header_bytes_parses_like_the_packet() {
        let mut short = [0u8; 40];
        short[0] = 0x40;
        short[1..17].copy_from_slice(&[7; 16]);
        let packets: [(&[u8], usize); 5] = [
            (&long(0xc0, QUIC_V1, &[1; 20]), 1200),
            (&long(0xc0, QUIC_V1, &[1; 8]), 1199),
            (&long(0xe0, 0x1a2a_3a4a, &[3; 4]), 1300),
            (&short, 40),
            (&long(0xe0, QUIC_V2, &[]), 60),
        ];
        for (bytes, payload_len) in packets {
            let whole = parse_bytes(bytes, payload_len);
            let copy = parse(&bytes[..HEADER_BYTES], 0, payload_len, 16);
            match (whole, copy) {
                (Ok(a), Ok(b)) => assert!(a.dcid() == b.dcid() && a.form == b.form),
                (Err(a), Err(b)) => assert_eq!(a as u32, b as u32),
                _ => panic!("the copy parsed differently"),
            }
        }
    }

    #[test]
    fn invalid_packets_name_their_drop_counter() {
        let mut no_fixed_bit = [0u8; 40];
        no_fixed_bit[0] = 0x80;
        assert!(matches!(
            parse_bytes(&no_fixed_bit, 40),
            Err(Counter::DropFixedBit)
        ));
        let short_initial = long(0xc0, QUIC_V1, &[1; 8]);
        assert!(matches!(
            parse_bytes(&short_initial, 1199),
            Err(Counter::DropShortInitial)
        ));
        let mut too_long = long(0xc0, QUIC_V1, &[1; 8]);
        too_long[5] = 21;
        assert!(matches!(
            parse_bytes(&too_long, 1200),
            Err(Counter::DropDcidTooLong)
        ));
        // The payload ends inside the DCID.
        let cut = long(0xe0, QUIC_V1, &[1; 8]);
        assert!(matches!(
            parse_bytes(&cut[..10], 10),
            Err(Counter::DropTruncated)
        ));
        let short = [0x40u8, 1, 2, 3];
        assert!(matches!(
            parse_bytes(&short, 4),
            Err(Counter::DropTruncated)
        ));
    }
}
