//! `procmig-agent`: the stand-in for guest RAM in procmig's tests.
//!
//! `procmig-agent run` maps one RAM region at the fixed address
//! [`layout::BASE`] (`0x5a00_0000_0000`), fills it according to a profile
//! (zero, text, random, mixed), prints one ready line, and keeps rewriting
//! random pages at a given rate, like an application writing to a large
//! buffer. `procmig-agent verify DIR` checks an image of that process
//! written by the procmig receiver: every page must be exactly what the
//! agent last wrote there.
//!
//! To exercise live migration further, `run` can also discard pages of the
//! region with `MADV_DONTNEED` (`--dontneed-rate`), have the kernel rewrite
//! pages by read(2) from a pipe (`--kernel-writes`), keep changing its
//! memory map and threads outside the region (`--churn`, see [`churn`]),
//! and exit by itself (`--exit-after`).
//!
//! # Region layout (other tests rely on it)
//!
//! ```text
//! BASE                               page 0: header
//! BASE + P                           ledger: u32 generation per data page
//! BASE + (1 + ledger_pages) * P      data pages 0 .. data_pages
//! ```
//!
//! `P` is the page size. The header holds the magic `b"PMAGENT1"`, the layout
//! version, sizes, profile, seed, the `writes` counter, per-writer PRNG states
//! and per-writer in-flight slots, then (layout version 2) the
//! `churn_events`, `discards` and `kernel_writes` counters and the rates;
//! its field offsets are listed in [`layout`]. Data page `i` holds
//! `content(profile, seed, i, gen)` ([`content`]) with `gen = ledger[i]`:
//! zero pages are all zero; every other page starts with a 16-byte stamp
//! `(i: u64 LE, gen: u32 LE, check: u32 LE)`. If bit 31 of `ledger[i]` is
//! set the page was discarded and is all zero instead; the low 31 bits
//! keep its generation.
//!
//! A rewrite of page `i` on slot `t`: `inflight[t] = i + 1`,
//! `ledger[i] = (ledger[i] & 0x7fffffff) + 1`, write the new content,
//! `writes += 1`, `inflight[t] = 0`. A discard: `inflight[t] = i + 1`, set
//! bit 31 of `ledger[i]`, `madvise(MADV_DONTNEED)`, `discards += 1`,
//! `inflight[t] = 0`.
//!
//! # Ready line
//!
//! ```text
//! procmig-agent ready pid=<pid> base=0x<hex> size=<bytes> data_pages=<n>
//! ```

mod churn;
mod content;
mod layout;
mod verify;
mod workload;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_mangen::roff::{bold, roman, Roff};

use churn::Churn;
use content::Profile;
use layout::{Layout, BASE, MAX_THREADS};
use procmig::process::page_size;
use procmig::units::parse_size;
use workload::{map_region, KernelPipe, Params, Pool, Ram};

const LONG_ABOUT: &str = "\
Stand-in for guest RAM: a process that maps a RAM region at a fixed address, \
fills it, and keeps writing to it, like an application writing random numbers \
to a large buffer. It can also tell from a saved image of its memory whether \
any page is stale or torn.

The region is mapped at 0x5a0000000000. Page 0 is a header (magic PMAGENT1, \
sizes, profile, seed, a writes counter, per-writer in-flight slots), then \
comes a ledger with one u32 generation per data page, then the data pages. \
Data page i always holds content(profile, seed, i, ledger[i]); every non-zero \
page starts with a 16-byte stamp (i, gen, check). A ledger entry with bit 31 \
set marks a page discarded with MADV_DONTNEED, which must be all zero.

For live-migration tests, run can also discard pages (--dontneed-rate), have \
the kernel write pages by read(2) from a pipe (--kernel-writes), keep \
mapping, remapping and unmapping memory and starting short-lived threads \
outside the region (--churn), and exit by itself (--exit-after).";

#[derive(Parser, Debug)]
#[command(name = "procmig-agent", version, about = "Stand-in for guest RAM: fills memory, dirties it, verifies images of itself", long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Map the RAM region, fill it, print the ready line, keep dirtying pages until killed (or --exit-after)
    Run(RunArgs),
    /// Check an image of the agent written by the procmig receiver
    Verify(VerifyArgs),
    /// Write page content (generation 0) to stdout, to measure compressors
    Sample(SampleArgs),
    /// Print the man page (roff) to stdout
    Man,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Size of the RAM region (suffixes K, M, G, T: powers of 1024)
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    size: u64,
    /// How data pages are filled
    #[arg(long, value_enum, default_value_t = Profile::Text)]
    profile: Profile,
    /// Threads for the initial fill [default: number of CPUs]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    fill_threads: Option<u16>,
    /// Page rewrites per second after the fill, all writers together (0: stay idle)
    #[arg(long, value_name = "PAGES_PER_SEC", default_value_t = 0)]
    dirty_rate: u64,
    /// Writers rewrite random pages among the first BYTES of data pages [default: all]
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    working_set: Option<u64>,
    /// Writer threads sharing the rate; each owns a contiguous share of the pages
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=MAX_THREADS as i64))]
    threads: u16,
    /// Seed of all content and of the writers' page choices
    #[arg(long, value_name = "U64", default_value_t = 1)]
    seed: u64,
    /// If non-zero, writers rewrite only the first N data pages, in order, over and over
    #[arg(long, value_name = "N", default_value_t = 0)]
    hot_pages: u64,
    /// Discard random pages of the working set with MADV_DONTNEED, this many per second (0: none)
    ///
    /// The ledger marks a discarded page (bit 31) as all zero until its next rewrite, which
    /// continues its generation; verify checks that such pages are zero.
    #[arg(long, value_name = "PAGES_PER_SEC", default_value_t = 0)]
    dontneed_rate: u64,
    /// Have the kernel rewrite random pages of the working set, this many per second (0: none)
    ///
    /// A thread writes a page's next content into a pipe and read(2)s it straight into the
    /// page, so the write is the kernel's copy to user memory; the ledger protocol is that of
    /// any rewrite.
    #[arg(long, value_name = "RATE", default_value_t = 0)]
    kernel_writes: u64,
    /// Change the memory map outside the RAM region, this many events per second (0: none)
    ///
    /// Each event, chosen at random (seeded by --seed): mmap a new anonymous private mapping
    /// of 1-64 pages, munmap a whole one or its head or tail pages, mremap one (grow with
    /// MREMAP_MAYMOVE, or shrink), MADV_DONTNEED a few of its pages, rewrite some of its pages,
    /// or start a thread that writes to one for 5-100 ms and exits. At most 64 such mappings
    /// and 16 MiB at once; verify does not check them.
    #[arg(long, value_name = "RATE", default_value_t = 0)]
    churn: u64,
    /// Exit with status 0 this many seconds after the ready line (fractions allowed)
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    exit_after: Option<f64>,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Image directory (manifest.json and region files)
    #[arg(value_name = "IMAGE_DIR")]
    dir: PathBuf,
    /// Print a JSON object instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SampleArgs {
    /// Bytes of data pages to write (suffixes K, M, G, T)
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    size: u64,
    /// Page profile
    #[arg(long, value_enum, default_value_t = Profile::Text)]
    profile: Profile,
    /// Seed
    #[arg(long, value_name = "U64", default_value_t = 1)]
    seed: u64,
}

/// Parse `--exit-after`: a non-negative number of seconds.
fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected seconds, such as 2 or 0.5"))?;
    if !(0.0..=1e9).contains(&v) {
        return Err(format!(
            "bad duration {s:?}: expected seconds between 0 and 1e9"
        ));
    }
    Ok(v)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match run(&args) {
            Ok(never) => match never {},
            Err(e) => {
                eprintln!("procmig-agent: error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Verify(args) => verify_cmd(&args),
        Command::Sample(args) => match sample(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("procmig-agent: error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Man => match man(&mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("procmig-agent: error: cannot write the man page: {e}");
                ExitCode::from(1)
            }
        },
    }
}

enum Never {}

fn run(args: &RunArgs) -> Result<Never, String> {
    let layout = Layout::compute(args.size, page_size()).map_err(|e| e.to_string())?;
    let params = Params {
        profile: args.profile,
        seed: args.seed,
        dirty_rate: args.dirty_rate,
        working_set_pages: args.working_set.map(|b| b.div_ceil(layout.page_size)),
        hot_pages: args.hot_pages,
        threads: usize::from(args.threads),
        fill_threads: args
            .fill_threads
            .map_or_else(procmig::source::default_threads, usize::from),
        dontneed_rate: args.dontneed_rate,
        kernel_write_rate: args.kernel_writes,
        churn_rate: args.churn,
    };
    let plan = params.plan(&layout);
    if args.working_set.is_some() && Some(plan.working_set_pages) != params.working_set_pages {
        eprintln!(
            "procmig-agent: working set clamped to {} pages",
            plan.working_set_pages
        );
    }
    if plan.hot_pages != params.hot_pages {
        eprintln!("procmig-agent: hot pages clamped to {}", plan.hot_pages);
    }
    if args.dirty_rate > 0 && plan.writers != params.threads {
        eprintln!(
            "procmig-agent: using {} writer threads (one per page)",
            plan.writers
        );
    }

    let region = map_region(BASE, layout.total_size)?;
    let started = Instant::now();
    let ram = Ram::create(region, layout, &params)?;
    let secs = started.elapsed().as_secs_f64();
    let data_bytes = layout.data_pages * layout.page_size;
    eprintln!(
        "procmig-agent: filled {:.1} MiB ({}) with {} threads in {:.3} s ({:.0} MiB/s)",
        data_bytes as f64 / 1048576.0,
        args.profile,
        params.fill_threads,
        secs,
        data_bytes as f64 / 1048576.0 / secs.max(1e-9)
    );

    // The region lives until the process dies, and so do the writers.
    let pool: &'static Pool<'static> = Box::leak(Box::new(ram.into_pool()));
    let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .map(drop)
            .map_err(|e| format!("cannot start thread {name}: {e}"))
    };
    if args.dirty_rate > 0 {
        let per_thread = args.dirty_rate as f64 / pool.writers() as f64;
        for t in 0..pool.writers() {
            spawn(
                format!("writer-{t}"),
                Box::new(move || pool.run_writer(t, per_thread)),
            )?;
        }
    }
    if args.dontneed_rate > 0 {
        let (rate, seed) = (args.dontneed_rate as f64, args.seed);
        spawn(
            "discard".into(),
            Box::new(move || pool.run_discards(rate, seed)),
        )?;
    }
    if args.kernel_writes > 0 {
        let pipe = KernelPipe::new(layout.page_size as usize)
            .map_err(|e| format!("cannot create the pipe for kernel writes: {e}"))?;
        let (rate, seed) = (args.kernel_writes as f64, args.seed);
        spawn(
            "kernel-write".into(),
            Box::new(move || pool.run_kernel_writes(rate, seed, pipe)),
        )?;
    }
    if args.churn > 0 {
        let churn = Churn::new(
            args.seed,
            layout.page_size as usize,
            &pool.header().churn_events,
        );
        let rate = args.churn as f64;
        spawn("churn".into(), Box::new(move || churn.run(rate)))?;
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "procmig-agent ready pid={} base={BASE:#x} size={} data_pages={}",
        std::process::id(),
        layout.total_size,
        layout.data_pages
    )
    .and_then(|()| out.flush())
    .map_err(|e| format!("cannot print the ready line: {e}"))?;
    drop(out);
    match args.exit_after {
        Some(secs) => {
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left);
            }
            eprintln!("procmig-agent: exiting after {secs} s (--exit-after)");
            // Stdout was flushed after the ready line and stderr is not
            // buffered; leave at once, without running exit handlers while
            // the other threads still write memory.
            // SAFETY: _exit has no preconditions; it ends every thread.
            unsafe { libc::_exit(0) }
        }
        None => loop {
            std::thread::park();
        },
    }
}

fn verify_cmd(args: &VerifyArgs) -> ExitCode {
    let started = Instant::now();
    match verify::verify_image(&args.dir, procmig::source::default_threads()) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                for line in report.lines() {
                    println!("{line}");
                }
            }
            eprintln!(
                "procmig-agent: verified {} in {:.3} s",
                args.dir.display(),
                started.elapsed().as_secs_f64()
            );
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({ "ok": false, "error": e }));
            }
            eprintln!("verify: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn sample(args: &SampleArgs) -> Result<(), String> {
    let ps = page_size() as usize;
    let pages = args.size.div_ceil(ps as u64);
    let mut out = std::io::stdout().lock();
    let chunk_pages = 256;
    let mut buf = vec![0u8; chunk_pages * ps];
    let mut gen_secs = 0.0;
    let mut i = 0;
    while i < pages {
        let n = (pages - i).min(chunk_pages as u64) as usize;
        let t = Instant::now();
        for (k, page) in buf[..n * ps].chunks_exact_mut(ps).enumerate() {
            content::fill_page(args.profile, args.seed, i + k as u64, 0, page);
        }
        gen_secs += t.elapsed().as_secs_f64();
        out.write_all(&buf[..n * ps])
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
        i += n as u64;
    }
    out.flush()
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    let mib = (pages * ps as u64) as f64 / 1048576.0;
    eprintln!(
        "procmig-agent: generated {mib:.1} MiB ({}) on one thread in {gen_secs:.3} s ({:.0} MiB/s)",
        args.profile,
        mib / f64::max(gen_secs, 1e-9)
    );
    Ok(())
}

/// The man page: clap_mangen's sections for the top-level command, then the
/// options of every subcommand, then exit status and the region layout.
fn man(out: &mut dyn Write) -> std::io::Result<()> {
    let mut buf = Vec::new();
    man_sections(&mut buf)?;
    // Every rendered piece starts with the same preamble; keep the first.
    let preamble = Roff::new().render();
    let text = String::from_utf8_lossy(&buf);
    let body = text.replace(&preamble, "");
    out.write_all(preamble.as_bytes())?;
    out.write_all(body.as_bytes())?;
    out.flush()
}

fn man_sections(w: &mut dyn Write) -> std::io::Result<()> {
    let cmd = Cli::command();
    let page = clap_mangen::Man::new(cmd.clone());
    page.render_title(w)?;
    page.render_name_section(w)?;
    page.render_synopsis_section(w)?;
    page.render_description_section(w)?;
    let subs: Vec<_> = cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help")
        .collect();
    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in &subs {
        roff.control("TP", []);
        roff.text([bold(format!("procmig-agent {}", sub.get_name()))]);
        if let Some(about) = sub.get_about() {
            roff.text([roman(about.to_string())]);
        }
    }
    roff.to_writer(w)?;
    for sub in subs {
        let name = sub.get_name();
        let heading = match name {
            "run" => "Run options",
            "verify" => "Verify options",
            "sample" => "Sample options",
            _ => "Options",
        };
        let sub = sub
            .clone()
            .bin_name(format!("procmig-agent {name}"))
            .disable_help_flag(true)
            .mut_args(|a| a.help_heading(heading));
        let usage = sub.clone().render_usage().to_string();
        let usage = usage.trim().trim_start_matches("Usage:").trim().to_owned();
        let mut roff = Roff::new();
        roff.control("SH", [format!("{} COMMAND", name.to_uppercase()).as_str()]);
        roff.text([bold(usage)]);
        if let Some(about) = sub.get_about() {
            roff.control("PP", []);
            roff.text([roman(about.to_string())]);
        }
        roff.to_writer(w)?;
        if sub.get_arguments().next().is_some() {
            clap_mangen::Man::new(sub).render_options_section(w)?;
        }
    }
    let mut roff = Roff::new();
    roff.control("SH", ["READY LINE"]);
    roff.text([roman(
        "When the fill is done and the writers run, run prints exactly one line to stdout, then nothing else:",
    )]);
    roff.control("PP", []);
    roff.text([bold(
        "procmig-agent ready pid=<pid> base=0x<hex> size=<bytes> data_pages=<n>",
    )]);
    roff.control("SH", ["REGION LAYOUT"]);
    roff.text([roman(
        "With P the page size: page 0 (at 0x5a0000000000) is the header; the next \
         ceil(data_pages*4/P) pages are the ledger, one native-endian u32 generation per \
         data page; then come the data pages. Header fields are 64-bit words at byte \
         offsets: 0 magic (PMAGENT1), 8 version (2), 16 total_size, 24 page_size, \
         32 data_pages, 40 ledger_pages, 48 profile (0 zero, 1 text, 2 random, 3 mixed), \
         56 seed, 64 working_set_pages, 72 hot_pages, 80 threads, 88 dirty_rate, \
         96 writes, 104 rng[64], 616 inflight[64] (0, or 1 + the page a writer is rewriting \
         or discarding), 1128 churn_events, 1136 discards, 1144 kernel_writes, \
         1152 dontneed_rate, 1160 kernel_write_rate, 1168 churn_rate.",
    )]);
    roff.control("PP", []);
    roff.text([roman(
        "The low 31 bits of ledger[i] are the generation gen of data page i; bit 31 is the \
         discarded flag. Data page i holds content(profile, seed, i, gen), or, if the flag \
         is set, all zero bytes. Zero pages are all zero; any other page starts with a \
         16-byte stamp: i (u64 LE), gen (u32 LE), check (u32 LE). A rewrite of page i on \
         writer slot t sets inflight[t] = i+1, sets ledger[i] to gen+1 (clearing the flag), \
         writes the new content (for --kernel-writes: by read(2) from a pipe), increments \
         writes (and kernel_writes), and clears inflight[t]. A discard sets inflight[t] = i+1, \
         sets the flag, calls madvise(MADV_DONTNEED) on the page, increments discards, and \
         clears inflight[t]; the generation is kept, so the next rewrite continues from it.",
    )]);
    roff.control("PP", []);
    roff.text([roman(
        "verify checks every page not named by an in-flight slot against its ledger entry, \
         and that writes <= sum of generations <= writes + in-flight slots, \
         flagged pages <= discards + in-flight slots, and kernel_writes <= writes. \
         Churn mappings (--churn) lie outside the region and are not checked; their \
         non-zero pages start with the words PMCHURN1, mapping id, page number and version.",
    )]);
    roff.control("SH", ["EXIT STATUS"]);
    roff.text([roman(
        "verify exits 0 if every page checks out, 1 if any page or the writes counter is \
         wrong, 2 if the image cannot be read or is not an image of the agent. run exits 1 \
         if it cannot start (for example the address range is already mapped), and 0 \
         --exit-after SECONDS after the ready line; it never exits by itself otherwise. \
         Usage errors exit 2.",
    )]);
    roff.to_writer(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        assert_eq!(parse_seconds("2"), Ok(2.0));
        assert_eq!(parse_seconds("0"), Ok(0.0));
        for bad in ["", "-1", "x", "NaN", "inf", "1e10"] {
            assert!(parse_seconds(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn man_page_renders() {
        let mut out = Vec::new();
        man(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for needle in [
            "RUN COMMAND",
            "dirty\\-rate",
            "dontneed\\-rate",
            "kernel\\-writes",
            "\\-\\-churn",
            "exit\\-after",
            "VERIFY COMMAND",
            "EXIT STATUS",
        ] {
            assert!(text.contains(needle), "{needle} missing");
        }
    }
}
