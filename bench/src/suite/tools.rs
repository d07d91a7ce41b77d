//! The outside tools the benchmark drives: `wrk` (HTTP/1.1 throughput), `h2load` (h2c
//! throughput), and the reference proxies `haproxy` and `nginx`. They are found on `PATH`, or
//! installed with `apt-get` when the benchmark runs as root; otherwise it stops and names the
//! packages to install. The parsers read the tools' human-readable summaries.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Serialize;

/// A tool and the Debian package that has it.
const TOOLS: [(&str, &str); 4] = [("wrk", "wrk"), ("h2load", "nghttp2-client"), ("haproxy", "haproxy"), ("nginx", "nginx")];

/// Where each tool is.
#[derive(Debug, Clone)]
pub struct Tools {
    pub wrk: PathBuf,
    pub h2load: PathBuf,
    pub haproxy: PathBuf,
    pub nginx: PathBuf,
}

impl Tools {
    /// Finds every tool, installing the missing ones when running as root.
    pub fn find_or_install() -> anyhow::Result<Self> {
        let missing: Vec<(&str, &str)> = TOOLS.iter().copied().filter(|(tool, _)| which(tool).is_none()).collect();
        if !missing.is_empty() {
            let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
            if !super::is_root() {
                bail!(
                    "missing {}: install the Debian/Ubuntu packages with `sudo apt-get install -y {}` (or run as root, \
                     and ferry-bench installs them)",
                    missing.iter().map(|(tool, _)| *tool).collect::<Vec<_>>().join(", "),
                    packages.join(" ")
                );
            }
            eprintln!("ferry-bench: installing {}", packages.join(" "));
            run_quietly(Command::new("apt-get").arg("update")).context("apt-get update")?;
            run_quietly(Command::new("apt-get").args(["install", "-y", "--no-install-recommends"]).args(&packages))
                .with_context(|| format!("apt-get install -y {}", packages.join(" ")))?;
        }
        let find = |tool: &str| {
            which(tool).with_context(|| {
                let package = TOOLS.iter().find(|(t, _)| *t == tool).map_or(tool, |(_, p)| p);
                format!("{tool} is not on PATH after installing {package}")
            })
        };
        Ok(Self { wrk: find("wrk")?, h2load: find("h2load")?, haproxy: find("haproxy")?, nginx: find("nginx")? })
    }

    /// One line naming each tool's version, for the report.
    pub fn versions(&self) -> Vec<String> {
        let first_line = |program: &Path, arg: &str| {
            let output = Command::new(program).arg(arg).output().ok()?;
            let text = if output.stdout.is_empty() { output.stderr } else { output.stdout };
            let line = String::from_utf8_lossy(&text).lines().next()?.to_owned();
            // "wrk 4.1.0 [epoll] Copyright (C) ...", "HAProxy version 2.6.12 2023/01/01 - https://haproxy.org/"
            let line = line.split(" Copyright").next().unwrap_or_default();
            Some(line.split(" - http").next().unwrap_or_default().trim().to_owned())
        };
        [(&self.wrk, "-v"), (&self.h2load, "--version"), (&self.haproxy, "-v"), (&self.nginx, "-v")]
            .into_iter()
            .filter_map(|(program, arg)| first_line(program, arg))
            .collect()
    }
}

/// `program` on `PATH` (plus the sbin directories, where nginx and haproxy live).
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn run_quietly(command: &mut Command) -> anyhow::Result<()> {
    let output = command.env("DEBIAN_FRONTEND", "noninteractive").output()?;
    if !output.status.success() {
        bail!("{}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// What a closed-loop throughput run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Throughput {
    /// Responses received, every status.
    pub requests: u64,
    /// Socket errors, timeouts and responses that are not 2xx.
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    /// The tool's mean latency (closed loop: for reference only).
    pub mean_latency_ms: Option<f64>,
}

/// `wrk --latency -t1 -cC -dD [EXTRA] URL`, where `extra` names the service when the listener
/// needs it (`-H "Host: bench"`, or `-s` with [`write_wrk_proxy_script`]'s script).
pub fn wrk_command(wrk: &Path, url: &str, connections: u32, duration: Duration, extra: &[OsString]) -> Command {
    let mut command = Command::new(wrk);
    command
        .args(["--latency", "-t1", "--timeout", "5s"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .args(extra);
    command.arg(url);
    command
}

/// `h2load` with prior-knowledge h2c: C connections, M streams each, for D seconds, with `extra`
/// (such as `-H ":authority: bench"`, which h2load sends in place of the URL's authority).
pub fn h2load_command(
    h2load: &Path,
    url: &str,
    connections: u32,
    streams: u32,
    duration: Duration,
    extra: &[OsString],
) -> Command {
    let mut command = Command::new(h2load);
    command
        .args(["-t1", "-T", "5"])
        .arg(format!("-c{connections}"))
        .arg(format!("-m{streams}"))
        .args(["-D", &duration.as_secs().max(1).to_string()])
        .args(extra)
        .arg(url);
    command
}

/// The name of the wrk script that makes wrk an HTTP proxy client.
pub const WRK_PROXY_SCRIPT: &str = "wrk-proxy.lua";

/// Writes into `dir` the wrk script that sends every request as to an HTTP proxy,
/// `GET http://AUTHORITY/ HTTP/1.1` with `Host: AUTHORITY`, and returns its path.
///
/// The script only sets wrk's request fields, once: without a `request()` function wrk builds
/// the request a single time and sends the same bytes on every request, as fast as with no
/// script, where a `request()` would run Lua for each one.
pub fn write_wrk_proxy_script(dir: &Path, authority: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(WRK_PROXY_SCRIPT);
    let script = format!(
        "-- ferry-bench: wrk as an HTTP proxy client. wrk connects to the URL on its command line and\n\
         -- names the service in an absolute-form request target, with the same authority in Host.\n\
         wrk.path = \"http://{authority}/\"\n\
         wrk.headers[\"Host\"] = \"{authority}\"\n"
    );
    std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Parses wrk's summary.
pub fn parse_wrk(output: &str) -> anyhow::Result<Throughput> {
    let mut result = Throughput::default();
    let mut seen_total = false;
    for line in output.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "1023456 requests in 10.00s, 1.10GB read"
            [count, "requests", "in", seconds, ..] => {
                result.requests = count.parse().context("wrk request count")?;
                result.seconds = parse_duration(seconds.trim_end_matches(','))?;
                seen_total = true;
            }
            ["Requests/sec:", rate] => result.requests_per_second = rate.parse().context("wrk Requests/sec")?,
            // "Latency   625.49us  176.43us   5.26ms   80.53%" (not "Latency Distribution")
            ["Latency", mean, _, _, _] => result.mean_latency_ms = Some(parse_duration(mean)? * 1000.0),
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            ["Socket", "errors:", rest @ ..] => {
                result.errors += rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => result.errors += count.parse::<u64>().context("wrk Non-2xx")?,
            _ => {}
        }
    }
    if !seen_total {
        bail!("no \"N requests in Ts\" line in wrk's output:\n{output}");
    }
    Ok(result)
}

/// Parses h2load's summary.
pub fn parse_h2load(output: &str) -> anyhow::Result<Throughput> {
    let mut result = Throughput::default();
    let mut seen_total = false;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 10.00s, 102345.60 req/s, 110.12MB/s"
            let mut parts = rest.split(", ");
            result.seconds = parse_duration(parts.next().unwrap_or_default())?;
            let rate = parts.next().unwrap_or_default().trim_end_matches(" req/s");
            result.requests_per_second = rate.parse().context("h2load req/s")?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: 100 total, 100 started, 98 done, 97 succeeded, 1 failed, 2 errored, 0 timeout"
            for part in rest.split(", ") {
                let Some((count, what)) = part.split_once(' ') else { continue };
                let count: u64 = count.parse().with_context(|| format!("h2load {what}"))?;
                match what {
                    "done" => result.requests = count,
                    "failed" | "errored" | "timeout" => result.errors += count,
                    _ => {}
                }
            }
            seen_total = true;
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // "status codes: 97 2xx, 0 3xx, 1 4xx, 0 5xx": 3xx and up count as errors too.
            for part in rest.split(", ") {
                if let Some((count, class)) = part.split_once(' ')
                    && class != "2xx"
                {
                    result.errors += count.parse::<u64>().with_context(|| format!("h2load {class}"))?;
                }
            }
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // min max mean sd +/-sd
            let mean = rest.split_whitespace().nth(2).context("h2load mean time for request")?;
            result.mean_latency_ms = Some(parse_duration(mean)? * 1000.0);
        }
    }
    if !seen_total {
        bail!("no \"requests: ...\" line in h2load's output:\n{output}");
    }
    Ok(result)
}

/// Parses `625.49us`, `1.20ms`, `10.00s`, `2m` into seconds.
fn parse_duration(text: &str) -> anyhow::Result<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic()).with_context(|| format!("{text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("{text:?} is not a duration"))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => bail!("{text:?}: unknown unit {unit:?}"),
    };
    Ok(number * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "\
Running 10s test @ http://127.0.0.1:41237/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   625.49us  176.43us   5.26ms   80.53%
    Req/Sec   102.86k     5.58k  111.20k    73.00%
  Latency Distribution
     50%  600.00us
     75%  700.00us
     90%  800.00us
     99%    1.20ms
  1023456 requests in 10.00s, 1.10GB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec: 102345.60
Transfer/sec:    112.34MB
";

    const H2LOAD: &str = "\
starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 0s warm-up time and 10s main duration
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 10.00s, 51234.50 req/s, 55.61MB/s
requests: 512345 total, 512361 started, 512345 done, 512340 succeeded, 5 failed, 1 errored, 2 timeout
status codes: 512340 2xx, 0 3xx, 3 4xx, 0 5xx
traffic: 556.12MB (583134567) total, 1.46MB (1532345) headers (space savings 95.12%), 500.34MB (524641280) data
                     min         max         mean         sd        +/- sd
time for request:      123us     12.34ms      4.96ms       456us    78.00%
time for connect:      123us       234us       178us        34us    60.00%
time to 1st byte:      345us       456us       400us        34us    60.00%
req/s           :    3123.45     3289.01     3202.15       45.67    62.50%
";

    #[test]
    fn wrk_summary() {
        let parsed = parse_wrk(WRK).expect("parses");
        assert_eq!(parsed.requests, 1_023_456);
        assert_eq!(parsed.errors, 8);
        assert!((parsed.seconds - 10.0).abs() < 1e-9);
        assert!((parsed.requests_per_second - 102_345.6).abs() < 1e-6);
        assert!((parsed.mean_latency_ms.expect("latency") - 0.62549).abs() < 1e-9);
    }

    #[test]
    fn h2load_summary() {
        let parsed = parse_h2load(H2LOAD).expect("parses");
        assert_eq!(parsed.requests, 512_345);
        // 5 failed + 1 errored + 2 timeout + 3 responses that are not 2xx.
        assert_eq!(parsed.errors, 11);
        assert!((parsed.requests_per_second - 51_234.5).abs() < 1e-6);
        assert!((parsed.mean_latency_ms.expect("latency") - 4.96).abs() < 1e-9);
    }

    #[test]
    fn output_without_a_summary_is_an_error() {
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_err());
        assert!(parse_h2load("No protocol negotiated").is_err());
    }

    #[test]
    fn the_proxy_script_sets_an_absolute_path_without_a_request_function() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = write_wrk_proxy_script(dir.path(), "bench").expect("written");
        let script = std::fs::read_to_string(&path).expect("readable");
        assert!(script.contains("wrk.path = \"http://bench/\"\n") && script.contains("wrk.headers[\"Host\"] = \"bench\"\n"));
        assert!(!script.contains("function"), "no per-request Lua: {script}");
        let extra = [OsString::from("-s"), path.clone().into_os_string()];
        let command = wrk_command(Path::new("wrk"), "http://127.0.0.1:1/", 4, Duration::from_secs(1), &extra);
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(&args[args.len() - 3..], [OsString::from("-s").as_os_str(), path.as_os_str(), "http://127.0.0.1:1/".as_ref()]);
    }

    #[test]
    fn durations_have_units() {
        assert_eq!(parse_duration("1.5ms").expect("ms"), 0.0015);
        assert_eq!(parse_duration("2m").expect("m"), 120.0);
        assert!(parse_duration("12").is_err());
    }
}
