//! A Redis server of one test's own (`infra/redis.sh`), on a port of its own: tests restart it,
//! set its pub/sub buffer limit and fill it, which would disturb every other test on a shared one.

/// A Redis server on a free port, stopped when dropped.
pub struct OwnRedis {
    script: std::path::PathBuf,
    port: u16,
}

impl OwnRedis {
    /// Starts it (a few milliseconds); panics if it does not answer.
    pub fn start() -> Self {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/redis.sh");
        // A port the system hands out, free now (Redis binds it at once).
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap();
        let status = std::process::Command::new(&script)
            .arg("up")
            .env("REDIS_PORT", port.to_string())
            .status()
            .expect("infra/redis.sh runs");
        assert!(status.success(), "a Redis server of the test's own on 127.0.0.1:{port}");
        OwnRedis { script, port }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A client of it.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// `infra/redis.sh ARGS...` on it (`restart`, `set-pubsub-limit 1mb 256kb 5`).
    pub fn control(&self, args: &[&str]) {
        let status = std::process::Command::new(&self.script)
            .args(args)
            .env("REDIS_PORT", self.port.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("infra/redis.sh runs");
        assert!(status.success(), "infra/redis.sh {args:?}");
    }
}

impl Drop for OwnRedis {
    /// Stops it and removes its directory (its append-only file).
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script).arg("purge").env("REDIS_PORT", self.port.to_string()).status();
    }
}
