//! Throwaway PostgreSQL servers for the demo and the tests: `initdb` in a temp
//! dir, `wal_level = logical`, a free loopback port, stopped and removed on drop.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

/// A running throwaway PostgreSQL server; superuser `cutover`, no password.
pub struct PostgresServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

/// The PostgreSQL server binaries: `$CUTOVER_PG_BIN`, else the newest under
/// /usr/lib/postgresql, else whatever `pg_ctl` is on the PATH.
pub fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CUTOVER_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let output = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context("no PostgreSQL server found: install it (apt-get install -y postgresql) or set CUTOVER_PG_BIN")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// A directory name no other sandbox server of any process uses. (A free port number is no
/// such name: two tests running at once can be handed the same one, and then one test's
/// cleanup removes the other's server.)
fn unique_dir(prefix: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    // Left by an earlier process that had this pid: it is gone.
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs a server binary; as root, as the `postgres` user, which initdb requires.
fn server_command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

/// With `CUTOVER_TEST_TIMEOUT_SECONDS` set (`make test` sets it), a process that starts
/// sandbox servers ends itself that many seconds after the first: a test that hangs fails
/// its test binary with a message, and the other binaries still run, instead of the
/// whole suite waiting until CI gives up on it.
fn watch_for_hangs() {
    static WATCH: std::sync::Once = std::sync::Once::new();
    WATCH.call_once(|| {
        let Some(limit) = std::env::var("CUTOVER_TEST_TIMEOUT_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()) else {
            return;
        };
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(limit));
            // Past the test harness's output capture, which a spawned thread inherits.
            let _ = writeln!(
                std::io::stderr(),
                "{} still runs {limit} s after it started its first sandbox server (CUTOVER_TEST_TIMEOUT_SECONDS): a test \
                 hangs — the ones cargo printed as running for over 60 seconds; stopping it and its child processes",
                std::env::args().next().unwrap_or_default()
            );
            kill_descendants(std::process::id());
            std::process::exit(101);
        });
    });
}

/// SIGKILLs every process below `pid` (servers, `cutover` children), deepest first.
fn kill_descendants(pid: u32) {
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // The parent pid is the second field after the parenthesised command name.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect();
    for child in children {
        kill_descendants(child);
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child as i32, libc::SIGKILL) };
    }
}

/// Starts a sandbox server, up to three times: the free port it picked can be taken
/// by someone else before the server binds it.
fn retry_start<T>(mut start: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    watch_for_hangs();
    let mut attempt = 1;
    loop {
        match start() {
            Ok(server) => return Ok(server),
            Err(e) if attempt < 3 => {
                tracing::warn!("a sandbox server did not start ({e:#}); trying again");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let output = command.output().with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

impl PostgresServer {
    /// Starts a server with `wal_level = logical` and the extra `settings`.
    pub fn start(settings: &[(&str, &str)]) -> anyhow::Result<PostgresServer> {
        Self::start_with(&postgres_bin_dir()?, settings)
    }

    /// Starts a server from the binaries in `bin`.
    pub fn start_with(bin: &Path, settings: &[(&str, &str)]) -> anyhow::Result<PostgresServer> {
        retry_start(|| Self::start_once(bin, settings))
    }

    fn start_once(bin: &Path, settings: &[(&str, &str)]) -> anyhow::Result<PostgresServer> {
        let dir = unique_dir("cutover-pg");
        std::fs::create_dir_all(&dir)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(&dir);
                    c
                },
                "chown of the sandbox dir",
            )?;
        }
        let data = dir.join("data");
        let mut initdb = server_command(bin, "initdb");
        initdb.arg("-D").arg(&data).args(["-U", "cutover", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"]);
        run(initdb, "initdb")?;
        let port = free_port()?;
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\nfsync = off\n\
             full_page_writes = off\nshared_buffers = '256MB'\nmax_wal_size = '4GB'\nlogging_collector = off\n",
            dir.display()
        );
        for (key, value) in settings {
            conf.push_str(&format!("{key} = {value}\n"));
        }
        let conf_path = data.join("postgresql.auto.conf");
        std::fs::write(&conf_path, conf)?;
        let server = PostgresServer { dir: dir.clone(), bin: bin.to_path_buf(), port };
        let mut start = server_command(bin, "pg_ctl");
        start.arg("-D").arg(&data).arg("-l").arg(dir.join("server.log")).args(["-w", "-t", "60", "start"]);
        run(start, "pg_ctl start").with_context(|| format!("see {}", dir.join("server.log").display()))?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://cutover@127.0.0.1:{}/{database}", self.port)
    }

    /// Makes `user` log in over TCP with a password (SCRAM), for SQL and replication
    /// connections alike; everyone else stays trusted. Takes effect once the server has
    /// reloaded its configuration (a moment after this returns).
    pub fn require_password(&self, user: &str) -> anyhow::Result<()> {
        let hba = self.dir.join("data").join("pg_hba.conf");
        let trusted = std::fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
        // The first matching line decides.
        let password_lines =
            format!("host all {user} 127.0.0.1/32 scram-sha-256\nhost replication {user} 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, password_lines + &trusted).with_context(|| format!("writing {}", hba.display()))?;
        let mut reload = server_command(&self.bin, "pg_ctl");
        reload.arg("-D").arg(self.dir.join("data")).arg("reload");
        run(reload, "pg_ctl reload")
    }

    /// Restarts the server (`pg_ctl restart -m fast`): every client connection drops.
    pub fn restart(&self) -> anyhow::Result<()> {
        let mut restart = server_command(&self.bin, "pg_ctl");
        restart
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"]);
        run(restart, "pg_ctl restart")
    }

    /// Stops the server (`mode`: smart, fast or immediate), keeping its data.
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let mut stop = server_command(&self.bin, "pg_ctl");
        stop.arg("-D").arg(self.dir.join("data")).args(["-m", mode, "-w", "stop"]);
        run(stop, "pg_ctl stop")
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self.stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running throwaway MariaDB server with `log-bin` and `binlog-format = ROW`;
/// user `cutover` with every privilege, no password.
pub struct MariaDbServer {
    dir: PathBuf,
    port: u16,
    process: std::process::Child,
    /// `mariadbd` and its arguments, to start it again.
    command: Vec<std::ffi::OsString>,
}

impl MariaDbServer {
    /// Starts a server with the extra `mariadbd` options in `options` (`--key=value`).
    pub fn start(options: &[&str]) -> anyhow::Result<MariaDbServer> {
        retry_start(|| Self::start_once(options))
    }

    fn start_once(options: &[&str]) -> anyhow::Result<MariaDbServer> {
        let dir = unique_dir("cutover-mariadb");
        let data = dir.join("data");
        std::fs::create_dir_all(&dir)?;
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let mut install = Command::new("mariadb-install-db");
        install.arg("--no-defaults").arg(format!("--datadir={}", data.display()));
        install.args(["--auth-root-authentication-method=socket", "--skip-test-db"]);
        if as_root {
            install.arg("--user=root");
        }
        run(install, "mariadb-install-db (apt-get install -y mariadb-server)")?;
        let port = free_port()?;
        let socket = dir.join("mariadb.sock");
        // Its own temp dir: internal temporary tables in a shared /tmp were seen vanishing under a
        // running server ("Error on delete of '/tmp/#sql-temptable-…'").
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let mut server = Command::new("mariadbd");
        server
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--log-bin={}", data.join("binlog").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args([
                "--bind-address=127.0.0.1",
                "--binlog-format=ROW",
                "--server-id=1",
                "--innodb-buffer-pool-size=256M",
                "--innodb-flush-log-at-trx-commit=2",
                "--sync-binlog=0",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
            ])
            .args(options)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if as_root {
            server.arg("--user=root");
        }
        let process = server.spawn().context("cannot start mariadbd (apt-get install -y mariadb-server)")?;
        let command = std::iter::once(server.get_program().to_os_string())
            .chain(server.get_args().map(|a| a.to_os_string()))
            .collect();
        let mut server = MariaDbServer { dir, port, process, command };
        server.wait_ready()?;
        Ok(server)
    }

    /// Waits until the server takes connections, then makes sure the user exists.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let socket = self.dir.join("mariadb.sock");
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.process.try_wait()? {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                anyhow::bail!(
                    "mariadbd exited with {status}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            let mut client = Command::new("mariadb");
            client.arg(format!("--socket={}", socket.display())).args([
                "-u",
                "root",
                "-e",
                "CREATE USER IF NOT EXISTS 'cutover'@'%'; GRANT ALL ON *.* TO 'cutover'@'%' WITH GRANT OPTION",
            ]);
            if run(client, "creating the sandbox user").is_ok() {
                return Ok(());
            }
            if started.elapsed() > std::time::Duration::from_secs(60) {
                anyhow::bail!(
                    "mariadbd did not accept connections within 60 s; see {}",
                    self.dir.join("error.log").display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Stops the server cleanly and starts it again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.process.id() as i32, libc::SIGTERM) };
        self.process.wait()?;
        let (program, args) = self.command.split_first().context("no mariadbd command")?;
        self.process = Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start mariadbd again")?;
        self.wait_ready()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` as the `cutover` user.
    pub fn url(&self, database: &str) -> String {
        format!("mysql://cutover@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for MariaDbServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
