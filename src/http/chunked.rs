//! HTTP/1.1 chunked framing of an event stream's frames: one chunk per
//! frame, or the bare bytes for an HTTP/1.0 client (a close-delimited
//! body).

/// Bytes an HTTP/1.1 chunk adds around a frame, at most: the size in hex
/// (16 digits) and two CRLFs.
pub(crate) const CHUNK_FRAMING: usize = 16 + 4;

/// Appends `frame` to `out` as the stream frames it: an HTTP/1.1 chunk when
/// `chunked`, the bare bytes otherwise (HTTP/1.0).
pub(crate) fn frame_into(out: &mut Vec<u8>, frame: &[u8], chunked: bool) {
    if chunked {
        chunk_into(out, frame);
    } else {
        out.extend_from_slice(frame);
    }
}

/// Appends `frame` to `out` as one HTTP/1.1 chunk.
pub(crate) fn chunk_into(out: &mut Vec<u8>, frame: &[u8]) {
    crate::digits::push_hex(out, frame.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(frame);
    out.extend_from_slice(b"\r\n");
}
