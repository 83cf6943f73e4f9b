//! Where `berth serve` writes its log lines: request handlers append each formatted line to a
//! shared buffer, and one writer thread writes what gathered in a single `write` at most every
//! [`FLUSH_INTERVAL`] (sooner once [`FLUSH_AT`] bytes wait; warnings and errors at once).
//!
//! Measured on the hot manifest path (2 CPUs, wrk -c8/-c64, a line per request at `info`):
//! tracing-appender's writer thread, which writes every line with its own system call and is
//! woken for nearly every line, cost 17-25 µs of CPU per request, as much as answering the
//! request itself. Here a line costs a lock and a copy; the writer thread wakes a few dozen
//! times a second however busy berth is.
//!
//! Never lossy and bounded: past [`MAX_PENDING`] bytes waiting, a thread that logs waits for the
//! writer. What is buffered is written when the [`LogGuard`] is dropped at exit.
//!
//! Architecture: docs/ARCHITECTURE.md, "Logging".

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Longest a line waits in the buffer before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// Bytes waiting that make the writer write at once rather than at the end of the interval.
const FLUSH_AT: usize = 256 * 1024;

/// Most bytes waiting; a thread that logs more waits until the writer took them.
const MAX_PENDING: usize = 8 * 1024 * 1024;

/// The writer thread's state, as the loggers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Writing, or about to look at the buffer: nobody needs to wake it.
    Busy,
    /// Waiting for a first line, without a timeout: the next line wakes it.
    Idle,
    /// Waiting out [`FLUSH_INTERVAL`] for more lines: woken early once [`FLUSH_AT`] bytes wait.
    Gathering,
}

struct State {
    buf: Vec<u8>,
    writer: Writer,
    /// A warning or an error waits: write without gathering more.
    urgent: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// How long the writer gathers lines ([`FLUSH_INTERVAL`] outside tests).
    interval: Duration,
    /// The writer waits here for lines.
    lines: Condvar,
    /// Loggers wait here for room.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `MakeWriter` for `tracing_subscriber::fmt`: every event is one `write` of one line.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes what is buffered and stops the writer thread when dropped.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer thread writing to `out`, and the handle loggers write to. Panics if no thread can
/// be started (at start-up, before anything else runs).
pub fn spawn<W: Write + Send + 'static>(out: W) -> (LogWriter, LogGuard) {
    spawn_gathering(out, FLUSH_INTERVAL)
}

/// [`spawn`] with another gathering interval.
fn spawn_gathering<W: Write + Send + 'static>(out: W, interval: Duration) -> (LogWriter, LogGuard) {
    let shared = Arc::new(Shared {
        interval,
        state: Mutex::new(State {
            buf: Vec::with_capacity(FLUSH_AT),
            writer: Writer::Busy,
            urgent: false,
            closed: false,
        }),
        lines: Condvar::new(),
        room: Condvar::new(),
    });
    let thread = std::thread::Builder::new()
        .name("berth-log".into())
        .spawn({
            let shared = shared.clone();
            move || write_loop(&shared, out)
        })
        .expect("start the log writer thread");
    (
        LogWriter {
            shared: shared.clone(),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    )
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::with_capacity(FLUSH_AT);
    loop {
        let mut st = shared.lock();
        if st.buf.is_empty() && !st.closed {
            st.writer = Writer::Idle;
            while st.buf.is_empty() && !st.closed {
                st = shared.lines.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        // Let lines gather for a moment rather than write each as it comes.
        if !st.closed && !st.urgent && st.buf.len() < FLUSH_AT {
            st.writer = Writer::Gathering;
            st = shared
                .lines
                .wait_timeout_while(st, shared.interval, |s| {
                    !s.closed && !s.urgent && s.buf.len() < FLUSH_AT
                })
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.writer = Writer::Busy;
        st.urgent = false;
        std::mem::swap(&mut st.buf, &mut spare);
        let closed = st.closed;
        drop(st);
        shared.room.notify_all();
        // A log that cannot be written has nowhere to report it; the lines are dropped.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        if closed && shared.lock().buf.is_empty() {
            return;
        }
    }
}

/// One event's writer: knows whether the line is a warning or an error.
pub struct LogLine<'a> {
    writer: &'a LogWriter,
    urgent: bool,
}

impl io::Write for LogLine<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.writer.append(line, self.urgent);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Write for &LogWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.append(line, false);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LogWriter {
    /// Appends one line (waiting while the buffer is full) and wakes the writer when it must
    /// write now: a first line, a full batch, a warning or an error.
    fn append(&self, line: &[u8], urgent: bool) {
        let shared = &*self.shared;
        let mut st = shared.lock();
        while st.buf.len() >= MAX_PENDING && !st.closed {
            st = shared.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let before = st.buf.len();
        st.buf.extend_from_slice(line);
        let was_urgent = st.urgent;
        st.urgent |= urgent;
        let wake = match st.writer {
            Writer::Idle => before == 0,
            Writer::Gathering => {
                (before < FLUSH_AT && st.buf.len() >= FLUSH_AT) || (urgent && !was_urgent)
            }
            Writer::Busy => false,
        };
        drop(st);
        if wake {
            shared.lines.notify_one();
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine {
            writer: self,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LogLine {
            writer: self,
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.lines.notify_one();
        self.shared.room.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(b);
            s.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_exit() {
        let sink = Sink::default();
        let (w, guard) = spawn(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        // One write per line, as the fmt layer does.
                        (&w).write_all(format!("t{t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let (text, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(text).unwrap();
        for t in 0..4 {
            let mine: Vec<_> = text
                .lines()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            assert_eq!(mine.len(), 20_000);
            for (i, l) in mine.iter().enumerate() {
                assert_eq!(*l, format!("t{t} line {i}"));
            }
        }
        // 80 000 lines, well under one write each.
        assert!(writes < 2_000, "{writes} writes");
    }

    #[test]
    fn a_lone_line_is_written_within_the_interval() {
        let sink = Sink::default();
        let (w, _guard) = spawn(sink.clone());
        writeln!(&w, "hello").unwrap();
        let deadline = std::time::Instant::now() + FLUSH_INTERVAL * 50;
        while sink.0.lock().unwrap().0.is_empty() {
            assert!(std::time::Instant::now() < deadline, "line not written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.0.lock().unwrap().0, b"hello\n");
    }

    #[test]
    fn a_warning_is_written_without_waiting_out_the_interval() {
        // An interval no test outlives: the warning can only be written because it cut the
        // gathering short.
        let sink = Sink::default();
        let (w, _guard) = spawn_gathering(sink.clone(), Duration::from_secs(3600));
        // Only a guard against hanging on a broken writer, far from any real wait.
        let hang = std::time::Instant::now() + Duration::from_secs(60);
        (&w).write_all(b"info\n").unwrap();
        while w.shared.lock().writer != Writer::Gathering {
            assert!(
                std::time::Instant::now() < hang,
                "the writer never gathered"
            );
            std::thread::yield_now();
        }
        assert!(
            sink.0.lock().unwrap().0.is_empty(),
            "written before the interval"
        );
        w.append(b"warn\n", true);
        while !sink.0.lock().unwrap().0.ends_with(b"warn\n") {
            assert!(std::time::Instant::now() < hang, "the warning waited");
            std::thread::yield_now();
        }
        assert_eq!(sink.0.lock().unwrap().0, b"info\nwarn\n");
    }

    #[test]
    fn a_full_buffer_makes_loggers_wait_not_drop() {
        // A sink slower than the loggers: the buffer fills, loggers wait, nothing is lost.
        #[derive(Clone, Default)]
        struct Slow(Arc<Mutex<usize>>);
        impl Write for Slow {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_millis(5));
                *self.0.lock().unwrap() += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let slow = Slow::default();
        let (w, guard) = spawn(slow.clone());
        let line = vec![b'x'; 64 * 1024];
        for _ in 0..(3 * MAX_PENDING / line.len()) {
            (&w).write_all(&line).unwrap();
            assert!(w.shared.lock().buf.len() <= MAX_PENDING + line.len());
        }
        drop(guard);
        assert_eq!(*slow.0.lock().unwrap(), 3 * MAX_PENDING);
    }
}
