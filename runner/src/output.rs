//! The command's standard output and error: copied byte for byte to the runner's own
//! (what `kubectl logs` shows), scanned for CUDA out-of-memory messages on the way, with
//! a bounded tail of stderr kept for the finished report, and split into lines shipped to
//! the dispatcher ([`crate::logs`]).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Messages that mean the GPU ran out of memory (PyTorch, CUDA runtime and driver,
/// cuBLAS, cuDNN, TensorFlow, JAX/XLA, NCCL).
pub const CUDA_OOM_PATTERNS: &[&str] = &[
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "cudaErrorMemoryAllocation",
    "torch.OutOfMemoryError",
    "torch.cuda.OutOfMemoryError",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "OOM when allocating tensor",
    "RESOURCE_EXHAUSTED: Out of memory",
    "Cuda failure 'out of memory'",
];

/// Bytes of stderr kept for the finished report.
pub const TAIL_BYTES: usize = 2048;
/// Lines of stderr kept for the finished report.
pub const TAIL_LINES: usize = 20;

/// Finds [`CUDA_OOM_PATTERNS`] in a stream read in arbitrary chunks: it keeps the last
/// bytes of each chunk, so a pattern split across two reads is still found.
#[derive(Debug, Default)]
pub struct OomScanner {
    carry: Vec<u8>,
    found: bool,
}

/// All patterns in one automaton: a single pass over each chunk.
static MATCHER: LazyLock<Option<aho_corasick::AhoCorasick>> =
    LazyLock::new(|| aho_corasick::AhoCorasick::new(CUDA_OOM_PATTERNS).ok());

impl OomScanner {
    fn longest() -> usize {
        CUDA_OOM_PATTERNS.iter().map(|p| p.len()).max().unwrap_or(0)
    }

    /// Feeds a chunk; true once any pattern was seen (in this or an earlier chunk).
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        if self.found {
            return true;
        }
        let keep = Self::longest().saturating_sub(1);
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(chunk);
        self.found = MATCHER.as_ref().is_some_and(|m| m.is_match(&window));
        let start = window.len().saturating_sub(keep);
        window.drain(..start);
        self.carry = window;
        self.found
    }
}

/// The last [`TAIL_BYTES`] bytes of a stream.
#[derive(Debug, Default)]
pub struct Tail {
    bytes: std::collections::VecDeque<u8>,
}

impl Tail {
    pub fn push(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(TAIL_BYTES)..];
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(TAIL_BYTES);
        self.bytes.drain(..overflow);
        self.bytes.extend(chunk);
    }

    /// The tail as text: at most [`TAIL_LINES`] lines and [`TAIL_BYTES`] bytes, invalid
    /// UTF-8 replaced, no trailing newline; `None` when nothing was written.
    #[must_use]
    pub fn text(&self) -> Option<String> {
        let (a, b) = self.bytes.as_slices();
        let bytes = [a, b].concat();
        tail_text(&bytes)
    }
}

/// See [`Tail::text`].
#[must_use]
pub fn tail_text(bytes: &[u8]) -> Option<String> {
    // Drop continuation bytes of a character cut at the front.
    let start = bytes
        .iter()
        .take(3)
        .take_while(|&&b| (0x80..0xc0).contains(&b))
        .count();
    let text = String::from_utf8_lossy(&bytes[start..]);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    let mut begin = 0;
    // Byte offset just after the TAIL_LINES-th newline from the end.
    for (count, (i, _)) in text.rmatch_indices('\n').enumerate() {
        if count + 1 == TAIL_LINES {
            begin = i + 1;
            break;
        }
    }
    let mut text = &text[begin..];
    // Replacement characters can make the text longer than the bytes it came from.
    while text.len() > TAIL_BYTES {
        let mut cut = text.len() - TAIL_BYTES;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = &text[cut..];
    }
    (!text.is_empty()).then(|| text.to_owned())
}

/// What the copy threads share with the rest of the runner.
#[derive(Debug, Default)]
pub struct Shared {
    pub cuda_oom: AtomicBool,
    pub stderr_tail: Mutex<Tail>,
    /// Where the output's lines go besides the runner's own output.
    pub logs: crate::logs::Shipper,
}

impl Shared {
    #[must_use]
    pub fn cuda_oom_seen(&self) -> bool {
        self.cuda_oom.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn stderr_tail(&self) -> Option<String> {
        self.stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .text()
    }
}

/// Where a copy thread writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn log_stream(self) -> protocol::LogStream {
        match self {
            Self::Stdout => protocol::LogStream::Stdout,
            Self::Stderr => protocol::LogStream::Stderr,
        }
    }
}

/// Starts a thread copying `source` to the runner's own `stream` until end of file.
/// A write failure (the runner's stdout closed) stops the copying but not the reading,
/// so the command never blocks on a full pipe.
pub fn spawn_copy<R: Read + Send + 'static>(
    source: R,
    stream: Stream,
    shared: Arc<Shared>,
) -> std::io::Result<JoinHandle<()>> {
    // A duplicate of fd 1: unbuffered writes, bytes exactly as read. Stderr goes through
    // std's handle, whose lock keeps the runner's own log lines whole.
    let stdout = match stream {
        Stream::Stdout => {
            use std::os::fd::AsFd;
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map(File::from)
                .ok()
        }
        Stream::Stderr => None,
    };
    std::thread::Builder::new()
        .name(format!("copy-{stream:?}").to_lowercase())
        .spawn(move || copy(source, stream, stdout, &shared))
}

fn copy<R: Read>(mut source: R, stream: Stream, mut stdout: Option<File>, shared: &Shared) {
    let mut buf = vec![0_u8; 64 * 1024];
    let mut scanner = OomScanner::default();
    let mut writable = true;
    let mut cutter = crate::logs::LineCutter::default();
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let chunk = &buf[..n];
        if writable {
            let written = match (stream, stdout.as_mut()) {
                (Stream::Stdout, Some(out)) => out.write_all(chunk),
                (Stream::Stdout, None) => Err(ErrorKind::BrokenPipe.into()),
                (Stream::Stderr, _) => std::io::stderr().lock().write_all(chunk),
            };
            writable = written.is_ok();
        }
        if stream == Stream::Stderr {
            shared
                .stderr_tail
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(chunk);
        }
        if scanner.feed(chunk) {
            shared.cuda_oom.store(true, Ordering::Relaxed);
        }
        shared.logs.push(stream.log_stream(), cutter.push(chunk));
    }
    if let Some(last) = cutter.finish() {
        shared.logs.push(stream.log_stream(), vec![last]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_pattern() {
        for pattern in CUDA_OOM_PATTERNS {
            let mut s = OomScanner::default();
            assert!(!s.feed(b"loading model...\n"));
            let line = format!("RuntimeError: {pattern}. Tried to allocate 2.00 GiB\n");
            assert!(s.feed(line.as_bytes()), "{pattern}");
        }
    }

    #[test]
    fn finds_a_pattern_split_across_chunks() {
        let text = b"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate";
        for cut in 1..text.len() {
            let mut s = OomScanner::default();
            let (a, b) = text.split_at(cut);
            s.feed(a);
            assert!(s.feed(b), "cut at {cut}");
        }
        let mut s = OomScanner::default();
        for byte in b"xx OOM when allocating tensor with shape" {
            s.feed(&[*byte]);
        }
        assert!(s.feed(b""));
    }

    #[test]
    fn ordinary_output_is_not_oom() {
        let mut s = OomScanner::default();
        assert!(!s.feed(b"host out of memory? no. CUDA ok. memory 3 GiB\n"));
        assert!(!s.feed(&[0xff; 100]));
    }

    #[test]
    fn tail_keeps_last_lines_and_bytes() {
        let mut t = Tail::default();
        assert_eq!(t.text(), None);
        for i in 0..100 {
            t.push(format!("line {i}\n").as_bytes());
        }
        let text = t.text().unwrap();
        assert_eq!(text.lines().count(), TAIL_LINES);
        assert!(text.starts_with("line 80\n"), "{text}");
        assert!(text.ends_with("line 99"));

        let mut t = Tail::default();
        t.push(&vec![b'a'; 5000]);
        t.push(b"b");
        let text = t.text().unwrap();
        assert_eq!(text.len(), TAIL_BYTES);
        assert!(text.ends_with("ab"));
    }

    #[test]
    fn tail_text_is_valid_and_bounded() {
        // A multi-byte character cut at the front is dropped, not replaced.
        let mut bytes = "é".repeat(2000).into_bytes();
        bytes.drain(..1);
        let text = tail_text(&bytes).unwrap();
        assert!(text.chars().all(|c| c == 'é'));
        // Invalid bytes grow when replaced; the result still fits.
        let text = tail_text(&[0xff; TAIL_BYTES]).unwrap();
        assert!(text.len() <= TAIL_BYTES);
        assert_eq!(tail_text(b"\n"), None);
        assert_eq!(tail_text(b"one\r\n").as_deref(), Some("one"));
    }
}
