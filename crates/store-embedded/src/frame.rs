//! The journal's byte format, shared by the single file and the segments.
//!
//! A journal file is an 8-byte magic, then frames. A frame is
//! `[payload length: u32 LE][CRC-32 of length and payload: u32 LE][payload]`. Nothing here knows
//! what a payload holds: the caller says whether a checksummed payload is a record.

use std::path::Path;

use farthing_store::StoreError;

/// The first bytes of every journal file, single or segment.
pub(crate) const MAGIC: &[u8; 8] = b"FARTHJ01";
pub(crate) const FRAME_HEADER_BYTES: usize = 8;
/// The largest payload: a full batch of payments with long descriptions fits many times over.
pub const RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// What [`scan`] calls with each whole frame: the offset where the frame starts, its payload.
pub(crate) type VisitFrame<'a> = dyn FnMut(usize, &[u8]) -> Result<(), StoreError> + 'a;

/// Appends one frame to `out`, its payload written by `write_payload`.
pub(crate) fn push_frame(out: &mut Vec<u8>, write_payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    write_payload(out);
    let payload_len = out.len() - start - FRAME_HEADER_BYTES;
    assert!(
        payload_len <= RECORD_BYTES_MAX,
        "record too large for the journal"
    );
    let len_bytes = (payload_len as u32).to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(&out[start + FRAME_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + 8].copy_from_slice(&hasher.finalize().to_le_bytes());
}

/// Visits the payload of every whole frame of a journal file's bytes, with the offset where
/// its frame starts, and returns where the whole frames end and how many there were. Damage at
/// the end (an unfinished append) ends the scan; damage followed by a frame whose checksum
/// holds and whose payload `is_record` accepts is an error, and so is a file that does not
/// start with the magic.
pub(crate) fn scan(
    bytes: &[u8],
    path: &Path,
    is_record: &dyn Fn(&[u8]) -> bool,
    visit: &mut VisitFrame<'_>,
) -> Result<(usize, u64), StoreError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(StoreError::Corrupt {
            offset: 0,
            reason: format!("{} is not a Farthing journal", path.display()),
        });
    }
    let mut offset = MAGIC.len();
    let mut count = 0u64;
    while offset < bytes.len() {
        let Some(payload) = read_frame(&bytes[offset..]) else {
            break;
        };
        visit(offset, payload)?;
        count += 1;
        offset += FRAME_HEADER_BYTES + payload.len();
    }
    if offset < bytes.len() && damage_is_followed_by_valid_frame(&bytes[offset..], is_record) {
        // A crash only ever damages the last append; damage with whole records after it is
        // lost or rotten data, and cutting there would drop acknowledged payments.
        return Err(StoreError::Corrupt {
            offset: offset as u64,
            reason: format!(
                "{}: a damaged record is followed by valid ones",
                path.display()
            ),
        });
    }
    Ok((offset, count))
}

/// Whether a valid frame (checksummed, and a record) starts anywhere after the damaged frame
/// at the start of `bytes`. The damaged frame's own length field is not trusted to find the
/// next frame: the damage may be in it.
fn damage_is_followed_by_valid_frame(bytes: &[u8], is_record: &dyn Fn(&[u8]) -> bool) -> bool {
    // Every valid frame's header holds a byte that is not zero (a length, or else a checksum,
    // which for an empty payload is not zero), so none starts after the last such byte: the
    // zeros of a segment made ahead are not searched one offset at a time.
    let Some(last) = last_nonzero(bytes) else {
        return false;
    };
    (1..=last).any(|start| read_frame(&bytes[start..]).is_some_and(is_record))
}

/// Whether `bytes` are all zeros (as the room of a segment made ahead is).
pub(crate) fn all_zeros(bytes: &[u8]) -> bool {
    last_nonzero(bytes).is_none()
}

/// Where the last byte that is not zero is, if any.
fn last_nonzero(bytes: &[u8]) -> Option<usize> {
    const CHUNK: usize = 4096;
    let mut end = bytes.len();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &bytes[start..end];
        if chunk.iter().fold(0u8, |any, byte| any | byte) != 0 {
            return chunk
                .iter()
                .rposition(|byte| *byte != 0)
                .map(|at| start + at);
        }
        end = start;
    }
    None
}

/// The payload of the frame at the start of `bytes`, if it is whole and its checksum holds.
fn read_frame(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return None;
    }
    let len_bytes: [u8; 4] = bytes[..4].try_into().expect("four bytes");
    let len = u32::from_le_bytes(len_bytes) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("four bytes"));
    if len > RECORD_BYTES_MAX || bytes.len() < FRAME_HEADER_BYTES + len {
        return None;
    }
    let payload = &bytes[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(payload);
    (hasher.finalize() == crc).then_some(payload)
}

/// Writes `frames` at the end of `file`, which holds `len` bytes, and returns once they are on
/// stable storage. A write refused part way (a full disk) is cut off again, so the file is as
/// it was and a later append continues from a clean end: the caller may answer "try later".
/// A failed fsync stops the process: the kernel may have dropped the dirty pages, so what is
/// on disk is unknown, and retrying can report success for data that is gone; recovery reads
/// what is really there.
pub(crate) fn append_durably(
    file: &mut std::fs::File,
    len: u64,
    frames: &[u8],
) -> Result<(), StoreError> {
    use std::io::{Seek, SeekFrom, Write};
    if let Err(error) = file.write_all(frames) {
        if let Err(cut) = file
            .set_len(len)
            .and_then(|()| file.seek(SeekFrom::Start(len)).map(|_| ()))
        {
            tracing::error!(%error, %cut, "cannot cut a failed append from the journal");
            std::process::abort();
        }
        return Err(error.into());
    }
    if let Err(error) = file.sync_data() {
        tracing::error!(%error, "fsync of the journal failed; stopping");
        std::process::abort();
    }
    Ok(())
}

/// The error for a segment, or a file with a segment after it, that ends in a damaged or
/// unfinished record at `end`.
pub(crate) fn damaged_before_last(path: &Path, end: usize) -> StoreError {
    StoreError::Corrupt {
        offset: end as u64,
        reason: format!(
            "{}: a damaged or unfinished record in a segment that has a segment after it",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_never_a_frame_and_the_search_after_damage_still_finds_one_before_them() {
        // An empty payload's checksum is not zero, so no run of zeros reads as a frame.
        assert!(read_frame(&[0u8; 64]).is_none());
        let mut empty = Vec::new();
        push_frame(&mut empty, |_| {});
        assert!(read_frame(&empty).is_some());
        assert_ne!(&empty[4..8], &[0, 0, 0, 0]);
        // Damage, then a whole frame, then the zeros of a segment made ahead: found.
        for payload in [&b""[..], b"a record", b"ends in zeros\0\0\0"] {
            let mut bytes = b"damaged!".to_vec();
            push_frame(&mut bytes, |out| out.extend_from_slice(payload));
            bytes.resize(bytes.len() + 10_000, 0);
            assert!(damage_is_followed_by_valid_frame(&bytes, &|_| true));
        }
        let mut bytes = b"damaged!".to_vec();
        bytes.resize(10_000, 0);
        assert!(!damage_is_followed_by_valid_frame(&bytes, &|_| true));
        assert_eq!(last_nonzero(&bytes), Some(7));
        assert_eq!(last_nonzero(&[0u8; 9_000]), None);
    }
}
