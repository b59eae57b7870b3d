//! Several `pushpull-local esm` processes on one mapping, for `tests/tests/runners.rs` and
//! `benches/runners.rs`: start them (killed by PID when dropped), read the shards' lease owners
//! from the checkpoint files, and read the Invoke API's invocation log.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use pushpull_local::localstack::Local;
use serde_json::{Value, json};

/// Runners of one mapping: `stream` into `function` behind `endpoint`, checkpoints (and logs,
/// summaries) under `dir`.
pub struct Group {
    pub stream: String,
    pub function: String,
    pub endpoint: String,
    pub dir: PathBuf,
    pub failover_ms: u64,
    pub batch_size: usize,
    children: Vec<Child>,
}

impl Group {
    pub fn new(stream: &str, function: &str, endpoint: &str, dir: &Path, failover_ms: u64, batch_size: usize) -> Self {
        Group {
            stream: stream.to_owned(),
            function: function.to_owned(),
            endpoint: endpoint.to_owned(),
            dir: dir.to_owned(),
            failover_ms,
            batch_size,
            children: Vec::new(),
        }
    }

    /// Starts runner `name` (its worker id) of the Kinesis mapping; returns its PID. Its log is
    /// `<dir>/<name>.log`, its summary `<dir>/<name>.json`.
    pub fn start(&mut self, name: &str, extra: &[&str]) -> u32 {
        let checkpoints = format!("file://{}", self.dir.join("esm").display());
        let mut args: Vec<String> = vec!["--no-template".into(), "--stream".into(), self.stream.clone()];
        args.extend(["--checkpoint-uri".into(), checkpoints, "--list-shards-every".into(), "1".into()]);
        args.extend(["--function-response-types".into(), "ReportBatchItemFailures".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, &args)
    }

    /// Starts `pushpull-local esm` as runner `name` with the group's function, endpoint, batch
    /// size, failover and summary file, and `args` (its source and the rest); returns its PID.
    pub fn spawn(&mut self, name: &str, args: &[String]) -> u32 {
        let bin = pushpull_local::runtime_api::workspace_binary("pushpull-local");
        assert!(
            bin.exists(),
            "{} is not built: `cargo build -p pushpull-local` (with --release for benches; `make bench-runners` does)",
            bin.display()
        );
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(bin)
            .args(["esm", "--function-name", &self.function])
            .args(["--invoke-endpoint", &self.endpoint, "--starting-position", "TRIM_HORIZON"])
            .args(["--batch-size", &self.batch_size.to_string()])
            .args(["--worker-id", name, "--failover-ms", &self.failover_ms.to_string()])
            .args(["--summary-json", self.dir.join(format!("{name}.json")).to_str().unwrap()])
            .args(args)
            .envs(pushpull_local::localstack::function_env())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    fn child(&mut self, pid: u32) -> &mut Child {
        self.children.iter_mut().find(|c| c.id() == pid).expect("a runner of this group")
    }

    /// kill -9, by PID; returns when it is gone.
    pub fn kill(&mut self, pid: u32) {
        let c = self.child(pid);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM, by PID.
    pub fn terminate(&mut self, pid: u32) {
        assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    }

    /// Waits for a runner to exit; kills it and fails, with the runners' logs, past `limit`.
    pub async fn wait(&mut self, pid: u32, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child(pid).try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill(pid);
                panic!("runner {pid} did not stop within {limit:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where the mapping's checkpoints are: `esm/<function>/<stream>/<mapping UUID>` under the
    /// store (the runners' `--checkpoint-uri` is `file://<dir>/esm`).
    pub fn checkpoint_dir(&self) -> std::path::PathBuf {
        let stream = self.dir.join("esm").join("esm").join(&self.function).join(&self.stream);
        std::fs::read_dir(&stream)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir())
            .unwrap_or(stream)
    }

    /// Each shard's lease owner now, from the checkpoint files.
    pub fn owners(&self) -> BTreeMap<String, Option<String>> {
        let dir = self.checkpoint_dir();
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(shard) = name.strip_prefix("shardId-").and_then(|s| s.strip_suffix(".json")) {
                let v: Value =
                    std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
                out.insert(format!("shardId-{shard}"), v["owner"].as_str().map(str::to_owned));
            }
        }
        out
    }

    /// The shards `who` holds now.
    pub fn held_by(&self, who: &str) -> HashSet<String> {
        self.owners().into_iter().filter(|(_, o)| o.as_deref() == Some(who)).map(|(s, _)| s).collect()
    }

    /// Waits until every one of `shards` shards has a lease and `ok` holds of the owners.
    pub async fn wait_for(
        &self,
        what: &str,
        shards: usize,
        limit: Duration,
        ok: impl Fn(&BTreeMap<String, Option<String>>) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            let owners = self.owners();
            if owners.len() == shards && ok(&owners) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}: {owners:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of every runner's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(runner) = name.strip_suffix(".log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                out += &format!("--- {runner}:\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        out
    }

    /// A runner's summary (`--summary-json`), written when it stopped.
    pub fn summary(&self, name: &str) -> Value {
        let path = self.dir.join(format!("{name}.json"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), self.logs()));
        serde_json::from_slice(&bytes).unwrap()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for c in &mut self.children {
            if c.try_wait().ok().flatten().is_none() {
                c.kill().ok();
                c.wait().ok();
            }
        }
    }
}

/// (start time, sequence numbers) of every successful invocation in an Invoke API log
/// (`InvokeServer::log_invocations`).
pub fn invocations(log: &Path) -> Vec<(f64, Vec<String>)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["error"] == json!(false))
        .map(|v| {
            let seqs = v["seqs"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
            (v["t"].as_f64().unwrap(), seqs)
        })
        .collect()
}

/// How many shards `who` holds in `owners` (as [`Group::owners`] reads them).
pub fn held(owners: &BTreeMap<String, Option<String>>, who: &str) -> usize {
    owners.values().filter(|o| o.as_deref() == Some(who)).count()
}

/// How many times each sequence number was invoked.
pub fn invoked_times(invocations: &[(f64, Vec<String>)]) -> HashMap<&str, usize> {
    let mut times: HashMap<&str, usize> = HashMap::new();
    for (_, seqs) in invocations {
        for s in seqs {
            *times.entry(s.as_str()).or_default() += 1;
        }
    }
    times
}

/// The environment of the pull function (`kinesis-rollup`) writing to `bucket`: output and
/// checkpoints there, grouped by `user`, summing `amount`.
pub fn rollup_env(bucket: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OUTPUT_URI", format!("s3://{bucket}/output")),
        ("CHECKPOINT_URI", format!("s3://{bucket}/checkpoints")),
        ("GROUP_BY_FIELD", "user".into()),
        ("SUM_FIELD", "amount".into()),
    ]
}

/// For each of `shards` handed to a new owner after `t0`: seconds from `t0` until that owner's
/// first invocation of the shard (the first invocation starting after its `taken` event in the
/// new owner's summary). `shard_of` maps sequence numbers to shards.
pub fn handover_delays(
    shards: &HashSet<String>,
    t0: f64,
    new_owner: &Value,
    invocations: &[(f64, Vec<String>)],
    shard_of: &HashMap<String, String>,
) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for shard in shards {
        let taken = new_owner["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["shard_id"] == json!(shard) && e["event"] == "taken" && e["at"].as_f64().unwrap() >= t0)
            .map(|e| e["at"].as_f64().unwrap())
            .fold(f64::INFINITY, f64::min);
        let first = invocations
            .iter()
            .filter(|(t, seqs)| *t >= taken && seqs.first().and_then(|s| shard_of.get(s)).is_some_and(|s| s == shard))
            .map(|(t, _)| *t)
            .fold(f64::INFINITY, f64::min);
        out.push((shard.clone(), taken - t0, first - t0));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Unix seconds now.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Waits until the function has been invoked with at least `records` records (the log of
/// [`invocations`]): an event to wait on, where a sleep would be a guess.
pub async fn wait_for_invoked(log: &Path, records: usize, limit: Duration) {
    let until = std::time::Instant::now() + limit;
    loop {
        let n: usize = invocations(log).iter().map(|(_, seqs)| seqs.len()).sum();
        if n >= records {
            return;
        }
        assert!(std::time::Instant::now() < until, "only {n} of {records} records invoked after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Puts `rounds` PutRecords of 100 records, one every `every`, records `from..` (see
/// [`put_round`]). Returns each record's (sequence number, shard).
pub async fn produce(
    l: &Local,
    stream: &str,
    from: u64,
    rounds: u64,
    every: Duration,
    users: u64,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for round in 0..rounds {
        out.extend(put_round(l, stream, from + round * 100, users).await);
        tokio::time::sleep(every).await;
    }
    out
}

/// Puts records `from..from + 100`, `{"user": "u<n % users>", "amount": 1, "n": n}` with
/// partition key `k<n>`, retrying refused entries. Returns each record's (sequence number, shard).
pub async fn put_round(l: &Local, stream: &str, from: u64, users: u64) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending: Vec<PutRecordsRequestEntry> = (from..from + 100)
        .map(|n| {
            PutRecordsRequestEntry::builder()
                .partition_key(format!("k{n}"))
                .data(Blob::new(json!({ "user": format!("u{}", n % users), "amount": 1, "n": n }).to_string()))
                .build()
                .unwrap()
        })
        .collect();
    while !pending.is_empty() {
        let r = l.kinesis.put_records().stream_name(stream).set_records(Some(pending.clone())).send().await.unwrap();
        let mut again = Vec::new();
        for (e, res) in pending.into_iter().zip(r.records()) {
            match (res.sequence_number(), res.shard_id()) {
                (Some(s), Some(shard)) if res.error_code().is_none() => out.push((s.to_owned(), shard.to_owned())),
                _ => again.push(e),
            }
        }
        pending = again;
    }
    out
}
