//! The postgres engine with real processes: Debian's PostgreSQL on an
//! atrest-fs mount, driven by psql, pgbench and pg_dump.

mod server_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use server_common::{atrest, atrest_ok, contains, files_under, tool, TestServer};

/// A postgres-engine server in a directory the `postgres` OS user can reach.
struct PgServer {
    _tmp: tempfile::TempDir,
    s: TestServer,
    password: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgServer {
    fn create(name: &str) -> PgServer {
        Self::create_with(name, &[])
    }

    fn create_with(name: &str, extra: &[&str]) -> PgServer {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let dir = tmp.path().join("server");
        let keystore = tmp.path().join("keystore");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "server",
            "create",
            "--engine",
            "postgres",
            "--name",
            name,
            "--data",
            dir.to_str().unwrap(),
            "--keystore",
            keystore.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        let out = atrest_ok(&args);
        assert!(out.contains("engine postgres"), "{out}");
        let password = std::fs::read_to_string(dir.join("initial-admin-password"))
            .unwrap()
            .trim()
            .to_string();
        PgServer {
            _tmp: tmp,
            s: TestServer::existing(dir, keystore),
            password,
        }
    }

    fn config(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.s.dir.join("server.json")).unwrap())
            .unwrap()
    }

    fn conninfo(&self, db: &str) -> String {
        format!(
            "host=localhost port={} user=atrest dbname={db} sslmode=verify-full sslrootcert={}",
            self.s.port,
            self.s.ca().display()
        )
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(tool(program))
            .args(args)
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// psql's whole output, success or not.
    fn try_psql(&self, db: &str, sql: &str) -> std::process::Output {
        Command::new(tool("psql"))
            .args(["-X", "-A", "-t", &self.conninfo(db), "-c", sql])
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap()
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        self.run(
            "psql",
            &[
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                &self.conninfo(db),
                "-c",
                sql,
            ],
        )
    }
}

fn mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

#[test]
fn postgres_engine_serves_pgbench_psql_and_pg_dump_and_keeps_nothing_in_plaintext() {
    let mut a = PgServer::create("pg-a");
    a.s.start(&[]);
    let dir = a.s.dir.clone();
    // The plaintext view is in the server's own mount namespace only.
    assert!(!mounts().contains(&dir.join("mnt").display().to_string()));
    assert!(std::fs::read_dir(dir.join("mnt")).unwrap().next().is_none());

    // Real PostgreSQL, with checksums, over verified TLS and SCRAM.
    let v = a.psql(
        "postgres",
        "select current_setting('server_version_num')::int >= 150000, current_setting('data_checksums'), ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert_eq!(v.trim(), "t|on|t");

    // pgbench -i -s 10, then a run with no failed transaction.
    a.run(
        "pgbench",
        &["-i", "-s", "10", "-q", &a.conninfo("postgres")],
    );
    let out = a.run(
        "pgbench",
        &["-c", "4", "-j", "2", "-T", "10", &a.conninfo("postgres")],
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    // psql's catalogue commands.
    let l = a.run("psql", &["-X", &a.conninfo("postgres"), "-c", "\\l"]);
    assert!(l.contains("template1"), "{l}");
    let dt = a.run("psql", &["-X", &a.conninfo("postgres"), "-c", "\\dt"]);
    assert!(dt.contains("pgbench_accounts"), "{dt}");
    let d = a.run(
        "psql",
        &["-X", &a.conninfo("postgres"), "-c", "\\d pgbench_accounts"],
    );
    assert!(
        d.contains("abalance") && d.contains("pgbench_accounts_pkey"),
        "{d}"
    );

    // Markers: in a table, in a sort that spills, in the server log.
    let marker = format!("ATRESTMARK{:x}", std::process::id() as u64 * 7919);
    a.psql(
        "postgres",
        &format!("create table m(v text); insert into m select '{marker}' || g from generate_series(1, 100000) g"),
    );
    let spill = a.psql(
        "postgres",
        "set work_mem = '64kB'; set log_temp_files = 0; \
         select count(distinct v) from (select v from m order by v desc) s",
    );
    assert_eq!(spill.trim().lines().last(), Some("100000"));
    let bad = Command::new(tool("psql"))
        .args([
            "-X",
            &a.conninfo("postgres"),
            "-c",
            &format!("select '{marker}-log'::int"),
        ])
        .env("PGPASSWORD", &a.password)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    a.psql("postgres", "checkpoint");
    // The log holds the value, read through the mount by PostgreSQL itself.
    let log = a.psql(
        "postgres",
        "select string_agg(pg_read_file('log/' || name), '') from pg_ls_logdir()",
    );
    assert!(
        log.contains(&format!("{marker}-log")),
        "the log is readable through the mount"
    );
    assert!(log.contains("temporary file"), "the sort spilled");

    // pg_dump of the database, restored into a second postgres-engine server.
    let dump = a.run("pg_dump", &["--no-owner", &a.conninfo("postgres")]);
    assert!(dump.contains("pgbench_accounts"));
    let mut b = PgServer::create("pg-b");
    b.s.start(&[]);
    let dump_file = b.s.tmp.path().join("dump.sql");
    std::fs::write(&dump_file, &dump).unwrap();
    b.run(
        "psql",
        &[
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            &b.conninfo("postgres"),
            "-f",
            dump_file.to_str().unwrap(),
        ],
    );
    let q = "select count(*), sum(abalance), (select count(*) from pgbench_history), (select md5(string_agg(v, ',' order by v)) from m) from pgbench_accounts";
    assert_eq!(a.psql("postgres", q), b.psql("postgres", q));
    let dump_b = b.run("pg_dump", &["--no-owner", &b.conninfo("postgres")]);
    // The same content (pg_dump's per-run \\restrict key aside; rows of a
    // table may come in another physical order).
    let norm = |d: &str| {
        let mut v: Vec<&str> = d.lines().filter(|l| !l.contains("restrict ")).collect();
        v.sort_unstable();
        v.join("\n")
    };
    assert!(
        norm(&dump) == norm(&dump_b),
        "the restored server's dump differs"
    );
    b.psql("postgres", "checkpoint");
    let st = b.s.stop();
    assert!(st.success(), "{st}: {}", b.s.log_text());

    // Stopped: nothing of the markers anywhere on disk.
    let st = a.s.stop();
    assert!(st.success(), "{st}: {}", a.s.log_text());
    assert_eq!(a.s.state()["state"], "Stopped");
    let scan: Vec<PathBuf> = vec![dir.clone(), std::env::temp_dir().join("atrest-scan-none")];
    let mut scanned = 0usize;
    for d in scan.iter().filter(|d| d.exists()) {
        for (p, bytes) in files_under(d) {
            scanned += bytes.len();
            assert!(
                !contains(&bytes, marker.as_bytes()),
                "{} holds the marker",
                p.display()
            );
            assert!(
                !contains(&bytes, b"pgbench_accounts"),
                "{} names a table in clear",
                p.display()
            );
        }
    }
    assert!(scanned > 100 << 20, "scanned only {scanned} bytes");
    let logs = std::fs::read_dir(dir.join("pgfs/pgdata/log"))
        .unwrap()
        .count();
    assert!(logs > 0, "the server log is in the encrypted tree");

    // Delete removes everything, the service key included.
    atrest_ok(&["server", "delete", "--data", dir.to_str().unwrap(), "--yes"]);
    assert!(!dir.exists());
}

#[test]
fn psycopg_gets_postgresql_types_exactly() {
    let mut a = PgServer::create("pg-types");
    a.s.start(&[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/server_py/pg_engine_types.py"
    );
    let out = Command::new(server_common::python())
        .arg(script)
        .env("ATREST_PORT", a.s.port.to_string())
        .env("ATREST_PASSWORD", &a.password)
        .env("ATREST_CA", a.s.ca())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok types"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = a.s.stop();
    assert!(st.success(), "{st}");
}

#[test]
fn postgres_engine_errors_name_what_to_fix() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let create = |extra: &[&str], sub: &str| {
        let name = sub.rsplit('/').next().unwrap();
        let mut args = vec![
            "server".to_string(),
            "create".into(),
            "--engine".into(),
            "postgres".into(),
            "--name".into(),
            name.into(),
            "--data".into(),
            tmp.path().join(sub).display().to_string(),
            "--keystore".into(),
            tmp.path().join("ks").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = atrest(&refs);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = create(&["--postgres-bin", "/nonexistent/bin"], "err-bin");
    assert!(
        !ok && err.contains("install the Debian package `postgresql`"),
        "{err}"
    );
    let (ok, err) = create(&["--os-user", "no-such-user-atrest"], "err-user");
    assert!(
        !ok && err.contains("does not exist") && err.contains("useradd"),
        "{err}"
    );
    // A directory the OS user cannot reach.
    let private = tmp.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (ok, err) = create(&[], "private/err-dir");
    assert!(
        !ok && err.contains("cannot reach") && err.contains("chmod o+x"),
        "{err}"
    );
    // The last one failed after its service key was made: no create that
    // failed leaves a key behind in the keystore.
    let keys = std::fs::read_dir(tmp.path().join("ks"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "key"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(
        keys, 0,
        "a failed create left its service key in the keystore"
    );
    // The port in use.
    let mut s = PgServer::create("err-port");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = atrest(&[
        "server",
        "start",
        "--data",
        s.s.dir.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is in use"), "{err}");
    assert_eq!(s.s.state()["state"], "Stopped");
    let _ = Path::new("");
    s.s.start(&[]);
    assert!(s.s.stop().success());
}

/// A PostgreSQL program from the newest /usr/lib/postgresql/N/bin (Debian
/// puts only some of them on PATH).
fn pg_bin(name: &str) -> PathBuf {
    let mut v: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql is installed (scripts/setup-test-deps.sh)")
        .flatten()
        .filter_map(|e| {
            Some((
                e.file_name().to_str()?.parse().ok()?,
                e.path().join("bin").join(name),
            ))
        })
        .filter(|(_, p)| p.exists())
        .collect();
    v.sort();
    v.pop().expect("the PostgreSQL program").1
}

/// The postmaster: the `postgres` child of the server process.
fn postmaster_of(server_pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ppid = status
            .lines()
            .find(|l| l.starts_with("PPid:"))?
            .split_whitespace()
            .nth(1)?;
        let name = status
            .lines()
            .find(|l| l.starts_with("Name:"))?
            .split_whitespace()
            .nth(1)?;
        (ppid == server_pid.to_string() && name == "postgres").then_some(pid)
    })
}

/// Transactions pgbench logged as completed (one line each, `-l`).
fn logged_transactions(dir: &Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count() as u64)
        .sum()
}

/// Rounds of pgbench killed at a random moment: PostgreSQL (even rounds;
/// the server starts it again) or the filesystem process, the server
/// itself (odd rounds; started again here). After each, every transaction
/// pgbench saw committed is there ([`pgbench_intact`]).
struct KillRounds {
    logs: tempfile::TempDir,
    seed: u64,
    acked: u64,
}

impl KillRounds {
    fn new() -> Self {
        KillRounds {
            logs: tempfile::tempdir().unwrap(),
            seed: std::process::id() as u64 | 1,
            acked: 0,
        }
    }

    /// One round; `before_kill` runs just before the kill.
    fn kill_under_pgbench(
        &mut self,
        a: &mut PgServer,
        round: u32,
        before_kill: impl FnOnce(&PgServer),
    ) {
        let prefix = format!("r{round}");
        let mut bench = Command::new(tool("pgbench"))
            .args(["-n", "-c", "4", "-j", "2", "-T", "60", "-l", "--log-prefix"])
            .arg(self.logs.path().join(&prefix))
            .arg(a.conninfo("postgres"))
            .env("PGPASSWORD", &a.password)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        std::thread::sleep(std::time::Duration::from_millis(400 + self.seed % 1600));
        before_kill(a);
        if round.is_multiple_of(2) {
            let pm = postmaster_of(a.s.pid()).expect("a postmaster under the server");
            server_common::signal_pid(pm, 9).unwrap();
        } else {
            a.s.kill9();
        }
        let _ = bench.wait();
        self.acked += logged_transactions(self.logs.path(), &prefix);
        if !round.is_multiple_of(2) {
            a.s.start(&[]);
        }
        pgbench_intact(a, self.acked, &format!("round {round}"));
    }
}

#[test]
fn kill_9_of_postgres_or_of_the_filesystem_process_under_pgbench_loses_no_acknowledged_transaction()
{
    let mut a = PgServer::create("pg-crash");
    a.s.start(&[]);
    a.run("pgbench", &["-i", "-s", "2", "-q", &a.conninfo("postgres")]);
    let mut rounds = KillRounds::new();
    for round in 0..20u32 {
        rounds.kill_under_pgbench(&mut a, round, |_| ());
    }
    let acked = rounds.acked;
    assert!(
        acked > 100,
        "only {acked} transactions acknowledged over 20 rounds"
    );
    let st = a.s.stop();
    assert!(st.success(), "{st}: {}", a.s.log_text());
}

/// The pgbench database is back (within 2 min), holds at least `acked`
/// history rows (every transaction pgbench saw committed), its balances
/// sum, and `pg_amcheck` finds every heap and index clean.
fn pgbench_intact(a: &PgServer, acked: u64, context: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let check = loop {
        let out = Command::new(tool("psql"))
            .args(["-X", "-A", "-t", &a.conninfo("postgres"), "-c"])
            .arg(
                "select (select count(*) from pgbench_history), \
                 (select sum(abalance) from pgbench_accounts), (select sum(bbalance) from pgbench_branches), \
                 (select sum(tbalance) from pgbench_tellers), (select coalesce(sum(delta), 0) from pgbench_history)",
            )
            .env("PGPASSWORD", &a.password)
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{context}: not back: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            a.s.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let f: Vec<i64> = check.split('|').map(|x| x.parse().unwrap()).collect();
    assert!(
        f[0] as u64 >= acked,
        "{context}: {} history rows < {acked} acknowledged",
        f[0]
    );
    assert!(
        f[1] == f[2] && f[2] == f[3] && f[3] == f[4],
        "{context}: balances differ: {check}"
    );
    let amcheck = Command::new(pg_bin("pg_amcheck"))
        .args(["--install-missing", "--heapallindexed", "-d", "postgres"])
        .env("PGHOST", "localhost")
        .env("PGPORT", a.s.port.to_string())
        .env("PGUSER", "atrest")
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", a.s.ca())
        .env("PGPASSWORD", &a.password)
        .output()
        .unwrap();
    assert!(
        amcheck.status.success(),
        "{context}: pg_amcheck: {}{}",
        String::from_utf8_lossy(&amcheck.stdout),
        String::from_utf8_lossy(&amcheck.stderr)
    );
}

/// The unit with the newest write of a two-slot ciphertext file: its index
/// and the slot holding that write.
fn newest_unit(bytes: &[u8]) -> (u64, u8) {
    use atrest_fs::layout::{Layout, SLOT};
    let l = Layout {
        slots: 2,
        infra: false,
    };
    let units = l.units_in(bytes.len() as u64);
    let mut best = (0u64, 0u64, 0u8);
    for i in 0..units {
        for k in 0..2u8 {
            let o = l.slot_offset(i, k) as usize;
            if o + SLOT > bytes.len() {
                continue;
            }
            let seq = u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap());
            if seq > best.0 {
                best = (seq, i, k);
            }
        }
    }
    (best.1, best.2)
}

#[test]
fn tampered_relation_and_wal_units_are_io_errors_never_wrong_rows() {
    use atrest_fs::layout::{Layout, META, SLOT};
    let mut a = PgServer::create("pg-tamper");
    a.s.start(&[]);
    a.psql(
        "postgres",
        "create table t(id int, v text); insert into t select g, repeat('x', 100) || g from generate_series(1, 3000) g; \
         create table u(id int, v text); insert into u select g, repeat('y', 100) || g from generate_series(1, 3000) g; checkpoint",
    );
    let want = a.psql("postgres", "select count(*), sum(id) from t");
    assert_eq!(want.trim(), "3000|4501500");
    let t_path = a
        .psql("postgres", "select pg_relation_filepath('t')")
        .trim()
        .to_string();
    let u_path = a
        .psql("postgres", "select pg_relation_filepath('u')")
        .trim()
        .to_string();
    let st = a.s.stop();
    assert!(st.success(), "{st}");
    let pgdata = a.s.dir.join("pgfs/pgdata");
    let t_file = pgdata.join(&t_path);
    let pristine = std::fs::read(&t_file).unwrap();
    let other = std::fs::read(pgdata.join(&u_path)).unwrap();
    let one = Layout {
        slots: atrest_fs::SlotPolicy::Postgres.slots_for(Path::new(&t_path)),
        infra: false,
    };
    assert_eq!(one.slots, 1, "relation files have one slot");
    let (o1, o2) = (
        one.slot_offset(1, 0) as usize,
        one.slot_offset(2, 0) as usize,
    );

    let mut flipped = pristine.clone();
    flipped[o1 + META + 300] ^= 0x04;
    let mut swapped = pristine.clone();
    swapped[o1..o1 + SLOT].copy_from_slice(&pristine[o2..o2 + SLOT]);
    swapped[o2..o2 + SLOT].copy_from_slice(&pristine[o1..o1 + SLOT]);
    let mut foreign = pristine.clone();
    foreign[o1..o1 + SLOT].copy_from_slice(&other[o1..o1 + SLOT]);
    for (what, bytes) in [
        ("flipped bit", &flipped),
        ("swapped units", &swapped),
        ("unit of another file", &foreign),
    ] {
        std::fs::write(&t_file, bytes).unwrap();
        a.s.start(&[]);
        let out = a.try_psql("postgres", "select count(*), sum(id) from t");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: rows served: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            err.contains("could not read block")
                && err.contains(&t_path)
                && err.contains("Input/output error"),
            "{what}: {err}"
        );
        // The other table is untouched and still served.
        assert_eq!(a.psql("postgres", "select count(*) from u").trim(), "3000");
        let st = a.s.stop();
        assert!(st.success(), "{what}: {st}");
        assert!(
            a.s.log_text().contains(&format!("{t_path}: unit 1")),
            "{what}: the server log names the file and unit"
        );
    }
    std::fs::write(&t_file, &pristine).unwrap();
    a.s.start(&[]);
    assert_eq!(a.psql("postgres", "select count(*), sum(id) from t"), want);
    let st = a.s.stop();
    assert!(st.success(), "{st}");

    // The WAL: the unit holding the shutdown checkpoint, which the start
    // must read. Which segment holds it is not visible from outside
    // (PostgreSQL switches segments at shutdown when it archives, and
    // recycles archived ones under later names), so each variant damages
    // the newest unit of every segment: the start must fail, naming a
    // segment and that segment's damaged unit.
    let wal_dir = pgdata.join("pg_wal");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().len() == 24)
        .collect();
    segs.sort();
    let two = Layout {
        slots: 2,
        infra: false,
    };
    let originals: Vec<(PathBuf, Vec<u8>, u64, u8)> = segs
        .iter()
        .map(|p| {
            let b = std::fs::read(p).unwrap();
            let (unit, slot) = newest_unit(&b);
            (p.clone(), b, unit, slot)
        })
        .collect();
    type Damage = fn(&[u8], &[u8], u64, u8, Layout) -> Vec<u8>;
    let variants: [(&str, Damage); 3] = [
        ("flipped bit", |wal, _, unit, slot, two| {
            let o = two.slot_offset(unit, slot) as usize;
            let mut b = wal.to_vec();
            b[o + META + 100] ^= 0x01;
            b
        }),
        ("swapped units", |wal, _, unit, _, two| {
            // With a neighbour (the shutdown checkpoint may open a fresh
            // segment: unit 0).
            let n = if unit > 0 { unit - 1 } else { unit + 1 };
            let (a, c) = (
                two.slot_offset(unit, 0) as usize,
                two.slot_offset(n, 0) as usize,
            );
            let mut b = wal.to_vec();
            if c + 2 * SLOT <= wal.len() {
                b[a..a + 2 * SLOT].copy_from_slice(&wal[c..c + 2 * SLOT]);
                b[c..c + 2 * SLOT].copy_from_slice(&wal[a..a + 2 * SLOT]);
            }
            b
        }),
        ("unit of another file", |wal, other, unit, _, two| {
            let a = two.slot_offset(unit, 0) as usize;
            let mut b = wal.to_vec();
            b[a..a + 2 * SLOT].copy_from_slice(&other[a..a + 2 * SLOT]);
            b
        }),
    ];
    for (what, damage) in variants {
        for (i, (p, wal, unit, slot)) in originals.iter().enumerate() {
            // Another file's unit at the same place: the next segment's,
            // or (one segment) the relation file's, twice.
            let other = match originals.get((i + 1) % originals.len()) {
                Some(o) if originals.len() > 1 && o.1.len() >= wal.len() => o.1.clone(),
                _ => {
                    let mut v = wal.clone();
                    let a = two.slot_offset(*unit, 0) as usize;
                    v[a..a + 2 * SLOT].copy_from_slice(&other[o1..o1 + SLOT].repeat(2));
                    v
                }
            };
            std::fs::write(p, damage(wal, &other, *unit, *slot, two)).unwrap();
        }
        // A server that starts after all runs in the foreground: give it
        // a deadline instead of waiting for it.
        let mut start = Command::new(server_common::bin())
            .args(["server", "start", "--data", a.s.dir.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while start.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let started = start.try_wait().unwrap().is_none();
        if started {
            let _ = start.kill();
        }
        let out = start.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !started && !out.status.success(),
            "WAL {what}: the server started"
        );
        assert!(
            err.contains("Input/output error"),
            "WAL {what}: PostgreSQL reports an I/O error: {err}"
        );
        assert!(
            originals.iter().any(|(p, _, unit, _)| {
                err.contains(p.file_name().unwrap().to_str().unwrap())
                    && err.contains(&format!("unit {unit}"))
            }),
            "WAL {what}: a segment and its damaged unit are named: {err}"
        );
        for (p, wal, _, _) in &originals {
            std::fs::write(p, wal).unwrap();
        }
    }
    a.s.start(&[]);
    assert_eq!(a.psql("postgres", "select count(*), sum(id) from t"), want);
    let st = a.s.stop();
    assert!(st.success(), "{st}");
}

#[test]
fn infrastructure_encryption_adds_a_second_layer_with_its_own_keystore() {
    // Scenario 2: every slot carries the AEGIS layer under its own
    // master key, in a keystore apart from the service key's.
    let infra_tmp = tempfile::tempdir().unwrap();
    let infra = infra_tmp.path().join("infra");
    let mut a = PgServer::create_with(
        "pg-infra",
        &[
            "--infrastructure-encryption",
            "--infra-keystore",
            infra.to_str().unwrap(),
        ],
    );
    let key_files = || {
        std::fs::read_dir(&infra)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>()
    };
    assert_eq!(key_files().len(), 1, "one infrastructure master key");
    a.s.start(&[]);
    let c = a.conninfo("postgres");
    a.run("pgbench", &["-i", "-s", "2", "-q", &c]);
    let out = a.run("pgbench", &["-n", "-c", "2", "-t", "200", &c]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let marker = format!("ATRESTINFRA{:x}", std::process::id() as u64 * 104_729);
    a.psql(
        "postgres",
        &format!("create table m(v text); insert into m select '{marker}' || g from generate_series(1, 20000) g; checkpoint"),
    );
    // A relation file: one slot per page, each 8,236 + 48 bytes.
    let rel = a.psql(
        "postgres",
        "select pg_relation_filepath('pgbench_accounts')",
    );
    let pages: u64 = a
        .psql(
            "postgres",
            "select pg_relation_size('pgbench_accounts') / 8192",
        )
        .trim()
        .parse()
        .unwrap();
    let file = a.s.dir.join("pgfs/pgdata").join(rel.trim());
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(pages > 100, "{pages}");
    assert_eq!(len, 8_192 + pages * (8_236 + 48), "{}", file.display());
    let st = a.s.stop();
    assert!(st.success(), "{st}");
    for (p, bytes) in files_under(&a.s.dir) {
        assert!(
            !contains(&bytes, marker.as_bytes()),
            "{} holds the marker",
            p.display()
        );
    }

    // Without its master key the server does not start, and says why.
    let aside = infra_tmp.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    let moved: Vec<(PathBuf, PathBuf)> = key_files()
        .into_iter()
        .map(|p| {
            let to = aside.join(p.file_name().unwrap());
            std::fs::rename(&p, &to).unwrap();
            (p, to)
        })
        .collect();
    let out = atrest(&["server", "start", "--data", a.s.dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("infrastructure"), "{err}");
    for (p, to) in &moved {
        std::fs::rename(to, p).unwrap();
    }
    a.s.start(&[]);
    let n = a.psql("postgres", "select count(*) from pgbench_accounts");
    assert_eq!(n.trim(), "200000");
    let st = a.s.stop();
    assert!(st.success(), "{st}");

    // Delete destroys the infrastructure master key with the server.
    let dir = a.s.dir.clone();
    atrest_ok(&["server", "delete", "--data", dir.to_str().unwrap(), "--yes"]);
    assert!(!dir.exists());
    assert!(key_files().is_empty(), "{:?}", key_files());
}

#[test]
fn postgres_engine_runs_under_the_one_lifecycle_with_metrics_status_and_webhooks() {
    let mut a = PgServer::create("pg-life");
    let dir = a.s.dir.to_str().unwrap().to_string();
    let (port, got) = server_common::webhook_receiver();
    atrest_ok(&[
        "server",
        "configure",
        "--data",
        &dir,
        "--webhook",
        &format!("http://127.0.0.1:{port}/alerts"),
    ]);
    let history_before = a.s.state()["history"].as_array().unwrap().len();
    // The server's limits reach PostgreSQL as its settings.
    a.s.start(&["--statement-timeout-ms", "1500", "--max-connections", "20"]);
    assert_eq!(
        a.psql("postgres", "show statement_timeout").trim(),
        "1500ms"
    );
    assert_eq!(a.psql("postgres", "show max_connections").trim(), "20");
    let out = a.try_psql("postgres", "select pg_sleep(3)");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("statement timeout"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // /metrics and /status, from the same endpoints as the sqlite engine.
    assert_eq!(a.s.metric("atrest_server_state{state=\"Ready\"}"), 1.0);
    a.psql(
        "postgres",
        "create table w(v text); insert into w select repeat('x', 100) from generate_series(1, 5000); checkpoint",
    );
    assert!(a.s.metric("atrest_fs_writes_total") > 0.0);
    assert!(a.s.metric("atrest_fs_fsyncs_total") > 0.0);
    assert_eq!(a.s.metric("atrest_fs_auth_failures_total"), 0.0);
    assert_eq!(a.s.metric("atrest_postgres_restarts_total"), 0.0);
    let status = a.s.http_get("/status");
    assert!(status.contains("\"state\":\"Ready\""), "{status}");
    assert!(status.contains("\"postgres_restarts\":0"), "{status}");

    // PostgreSQL killed: started again on the same mount, the server stays
    // Ready, and the activity log says what happened.
    let pm = postmaster_of(a.s.pid()).expect("a postmaster under the server");
    server_common::signal_pid(pm, 9).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while a.s.metric("atrest_postgres_restarts_total") < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no restart");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = a.try_psql("postgres", "select count(*) from w");
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5000");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "PostgreSQL did not come back"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(a.s.dir.join("activity.log")).unwrap();
    assert!(log.contains("\"event\":\"postgres_exited\""), "{log}");
    let st = a.s.stop();
    assert!(st.success(), "{st}");

    // The same states, in the same order, as the sqlite engine; one
    // webhook alert per state change.
    let history: Vec<serde_json::Value> =
        a.s.state()["history"].as_array().unwrap()[history_before..].to_vec();
    let states: Vec<&str> = history
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["Starting", "Ready", "Stopping", "Stopped"]);
    let got = got.lock().unwrap().clone();
    let mut alerts: Vec<&str> = got.iter().map(|a| a["state"].as_str().unwrap()).collect();
    alerts.sort();
    let mut want = states.clone();
    want.sort();
    assert_eq!(alerts, want, "one alert per state change: {got:?}");
    assert!(got.iter().all(|a| a["server"] == "pg-life"));
}

use atrest_vault::testkit::reqwest::Method;
use atrest_vault::testkit::{block_on, TestVault};
use serde_json::json;
use std::time::Duration;

/// A real vault with a key `tde` (purge protection on), the server's
/// identity granted get, wrapKey and unwrapKey, and its CA where `set-key`
/// reads it.
struct VaultSetup {
    vault: TestVault,
    admin: atrest_vault::VaultClient,
    client_id: String,
    ca: PathBuf,
    key_url: String,
}

fn vault_for(a: &PgServer) -> VaultSetup {
    let vault = TestVault::start(Path::new(env!("CARGO_BIN_EXE_atrest")), &[]);
    vault
        .admin_call(
            Method::PATCH,
            "/vault",
            Some(json!({"purgeProtection": true})),
        )
        .expect("purge protection on");
    let (admin, _, _) = vault.identity("key-admin", &["all"]);
    new_key_version(&admin);
    let client_id = a.config()["identity"]["client_id"]
        .as_str()
        .unwrap()
        .to_string();
    let cert = std::fs::read_to_string(a.s.dir.join("identity/identity.crt")).unwrap();
    vault
        .admin_call(
            Method::POST,
            "/identities",
            Some(json!({
                "name": "atrest-server", "kind": "managedIdentity", "clientId": client_id,
                "certificate": cert, "permissions": {"keys": ["get", "wrapKey", "unwrapKey"]},
            })),
        )
        .unwrap();
    let ca = a.s.dir.parent().unwrap().join("vault-ca.pem");
    std::fs::write(&ca, &vault.ca).unwrap();
    let key_url = format!("{}/keys/tde", vault.url);
    VaultSetup {
        vault,
        admin,
        client_id,
        ca,
        key_url,
    }
}

/// `atrest server set-key` to the vault key `key_url`.
fn set_key_args<'a>(dir: &'a str, key_url: &'a str, tenant: &'a str, ca: &'a Path) -> Vec<&'a str> {
    vec![
        "server",
        "set-key",
        "--data",
        dir,
        "--key",
        key_url,
        "--tenant",
        tenant,
        "--vault-ca",
        ca.to_str().unwrap(),
    ]
}

fn new_key_version(admin: &atrest_vault::VaultClient) {
    block_on(admin.call(
        Method::POST,
        "/keys/tde/create",
        Some(json!({"kty": "RSA", "key_size": 2048, "key_ops": ["wrapKey", "unwrapKey"]})),
    ))
    .expect("create key");
}

fn latest_kid(admin: &atrest_vault::VaultClient) -> String {
    let k = block_on(admin.get_key("tde", None)).unwrap();
    k["key"]["kid"].as_str().unwrap().to_string()
}

/// Both header slots of every file of the tree (the root file included).
fn tree_headers(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files_under(&dir.join("pgfs"))
        .into_iter()
        .map(|(p, b)| {
            let n = b.len().min(8192);
            (p, b[..n].to_vec())
        })
        .collect()
}

/// Every header of the tree (both slots of every file, the root's too)
/// names the key `want`, and none `not`: no wrapping is left under it.
fn headers_name(dir: &Path, want: &str, not: Option<&str>, context: &str) {
    for (p, h) in tree_headers(dir) {
        assert!(
            contains(&h, want.as_bytes()),
            "{context}{} does not name {want}",
            p.display()
        );
        if let Some(not) = not {
            assert!(
                !contains(&h, not.as_bytes()),
                "{context}{} still names {not}",
                p.display()
            );
        }
    }
}

/// Waits until state.json says `want`.
fn wait_state(s: &TestServer, want: &str, limit: std::time::Duration) -> serde_json::Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let st = s.state();
        if st["state"] == want {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not {want} after {limit:?}: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn postgres_engine_customer_key_set_lost_revalidated_and_rotated_from_the_one_control_plane() {
    let mut a = PgServer::create("pg-cmk");
    let VaultSetup {
        vault,
        admin,
        client_id,
        ca,
        key_url,
    } = vault_for(&a);
    let latest = || latest_kid(&admin);
    let dir = a.s.dir.to_str().unwrap().to_string();
    let service_key = a.config()["encryption"]["service_key"]
        .as_str()
        .unwrap()
        .to_string();
    atrest_ok(&[
        "server",
        "configure",
        "--data",
        &dir,
        "--key-check-interval-ms",
        "300",
    ]);
    // Every header names the service key before the switch.
    let headers = tree_headers(&a.s.dir);
    assert!(headers.len() > 100, "{} files", headers.len());
    a.s.start(&[]);
    a.psql(
        "postgres",
        "create table t(id int primary key, v text); insert into t select g, 'v' || g from generate_series(1, 1000) g",
    );

    // set-key online: the tree is rewrapped while PostgreSQL runs and
    // takes writes; then every header (both slots of every file and of the
    // root) names the customer key and none the service key.
    let writer = {
        let conn = a.conninfo("postgres");
        let pw = a.password.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            for i in 0..40 {
                let out = Command::new(tool("psql"))
                    .args([
                        "-X",
                        "-A",
                        "-t",
                        "-v",
                        "ON_ERROR_STOP=1",
                        &conn,
                        "-c",
                        &format!(
                            "insert into t select g, 'w' from generate_series({}, {}) g",
                            10_000 + i * 100,
                            10_099 + i * 100
                        ),
                    ])
                    .env("PGPASSWORD", &pw)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                n += 100;
            }
            n
        })
    };
    let out = atrest(&set_key_args(&dir, &key_url, &vault.tenant, &ca));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = writer.join().unwrap();
    let v1 = latest();
    headers_name(&a.s.dir, &v1, Some(&service_key), "");
    let count = |a: &PgServer| {
        a.psql("postgres", "select count(*) from t")
            .trim()
            .to_string()
    };
    assert_eq!(count(&a), (1000 + written).to_string());

    // The key disabled: Inaccessible at the next check. PostgreSQL is
    // stopped, the tree unmounted, and the port answers 57P03 with the
    // cause and no key URL, vault address or identity, over TLS too.
    block_on(admin.call(
        Method::PATCH,
        &format!("/keys/tde/{}?force=true", v1.rsplit('/').next().unwrap()),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap();
    let st = wait_state(&a.s, "Inaccessible", Duration::from_secs(20));
    assert!(st["reason"].as_str().unwrap().contains("disabled"), "{st}");
    // The engine locks (immediate shutdown, unmount, the port refusing)
    // before the state says Inaccessible.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while postmaster_of(a.s.pid()).is_some() || a.try_psql("postgres", "select 1").status.success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "PostgreSQL still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mnt = a.s.dir.join("mnt").display().to_string();
    let ns = std::fs::read_to_string(format!("/proc/{}/mountinfo", a.s.pid())).unwrap();
    assert!(!ns.contains(&mnt), "the tree is still mounted: {ns}");
    for sslmode in ["verify-full", "disable"] {
        let conn = a
            .conninfo("postgres")
            .replace("sslmode=verify-full", &format!("sslmode={sslmode}"));
        let out = Command::new(tool("psql"))
            .args(["-X", "-A", "-t", &conn, "-c", "select 1"])
            .env("PGPASSWORD", &a.password)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success());
        assert!(
            err.contains("customer-managed key is not accessible (the key is disabled)"),
            "{sslmode}: {err}"
        );
        for secret in [key_url.as_str(), vault.url.as_str(), client_id.as_str()] {
            assert!(
                !err.contains(secret),
                "{sslmode}: {secret} before authentication: {err}"
            );
        }
    }
    // Only revalidation or delete: a key switch is refused.
    let out = atrest(&["server", "rotate-key", "--data", &dir]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not Ready"));
    // Revalidation fails while the key is still disabled, and says why.
    let out = atrest(&["server", "revalidate", "--data", &dir]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("disabled"));

    // Enabled again, revalidated: mounted, crash recovery, Ready, with
    // every acknowledged row.
    block_on(admin.call(
        Method::PATCH,
        &format!("/keys/tde/{}", v1.rsplit('/').next().unwrap()),
        Some(json!({"attributes": {"enabled": true}})),
    ))
    .unwrap();
    atrest_ok(&["server", "revalidate", "--data", &dir]);
    assert_eq!(a.s.state()["state"], "Ready");
    assert_eq!(count(&a), (1000 + written).to_string());
    a.psql(
        "postgres",
        "insert into t values (1000000, 'after revalidation')",
    );

    // rotate-key: a new version; every header moves to it. The old
    // version can then be disabled: the server neither needs nor holds it.
    block_on(admin.call(
        Method::POST,
        "/keys/tde/create",
        Some(json!({"kty": "RSA", "key_size": 2048, "key_ops": ["wrapKey", "unwrapKey"]})),
    ))
    .unwrap();
    let v2 = latest();
    assert_ne!(v1, v2);
    atrest_ok(&["server", "rotate-key", "--data", &dir]);
    headers_name(&a.s.dir, &v2, Some(&v1), "");
    block_on(admin.call(
        Method::PATCH,
        &format!("/keys/tde/{}?force=true", v1.rsplit('/').next().unwrap()),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(a.s.state()["state"], "Ready");
    assert!(a.s.stop().success());
    a.s.start(&[]);
    assert_eq!(count(&a), (1001 + written).to_string());

    // Back to the service key, stopped (offline rewrap of the tree).
    assert!(a.s.stop().success());
    atrest_ok(&["server", "set-key", "--data", &dir, "--service"]);
    headers_name(&a.s.dir, &service_key, Some(&v2), "");
    a.s.start(&[]);
    assert_eq!(count(&a), (1001 + written).to_string());
    assert!(a.s.stop().success());
}

#[test]
fn a_postgres_engine_key_switch_killed_at_any_moment_is_finished_at_the_next_start() {
    let mut a = PgServer::create("pg-rekill");
    let VaultSetup {
        vault,
        admin,
        ca,
        key_url,
        ..
    } = vault_for(&a);
    let dir = a.s.dir.to_str().unwrap().to_string();
    a.s.start(&[]);
    a.psql(
        "postgres",
        "create table t(id int primary key); insert into t select generate_series(1, 1000)",
    );
    let out = atrest_ok(&set_key_args(&dir, &key_url, &vault.tenant, &ca));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let millis = report["report"]["millis"].as_u64().unwrap().max(20);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut versions = vec![latest_kid(&admin)];
    for round in 0..20 {
        let rows = 1000 + round;
        new_key_version(&admin);
        let want = latest_kid(&admin);
        versions.push(want.clone());
        let mut switch = Command::new(server_common::bin())
            .args(["server", "rotate-key", "--data", &dir])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = seed % (millis + millis / 4);
        std::thread::sleep(Duration::from_millis(at));
        a.s.kill9();
        let _ = switch.wait();
        // The next start finishes whatever switch was recorded before it
        // serves: the key in server.json is the one every header names.
        a.s.start(&[]);
        let config = a.config();
        assert_eq!(
            config["encryption"]["rewrap_from"]
                .as_array()
                .unwrap()
                .len(),
            0,
            "round {round} (killed after {at} ms of {millis}): {config}"
        );
        let version = config["encryption"]["customer_key"]["key"]["version"]
            .as_str()
            .unwrap()
            .to_string();
        headers_name(
            &a.s.dir,
            &version,
            None,
            &format!("round {round} (killed after {at} ms): "),
        );
        assert_eq!(
            a.psql("postgres", "select count(*) from t").trim(),
            rows.to_string()
        );
        a.psql(
            "postgres",
            &format!("insert into t values ({})", 10_000 + round),
        );
        eprintln!(
            "round {round}: killed after {at} ms of a {millis} ms switch; after restart: {}",
            if want.ends_with(&version) {
                "the new version"
            } else {
                "the previous version"
            }
        );
        if !want.ends_with(&version) {
            // Killed before the switch was recorded: it never happened.
            atrest_ok(&["server", "rotate-key", "--data", &dir]);
        }
    }
    let last = latest_kid(&admin);
    let version = last.rsplit('/').next().unwrap();
    headers_name(&a.s.dir, version, None, "");
    // Every earlier version disabled: no effect on the server, running or
    // restarted (no header needs one, and the monitor checks the latest).
    assert!(a.s.stop().success());
    atrest_ok(&[
        "server",
        "configure",
        "--data",
        &dir,
        "--key-check-interval-ms",
        "200",
    ]);
    a.s.start(&[]);
    for old in &versions[..versions.len() - 1] {
        headers_name(&a.s.dir, version, Some(old.rsplit('/').next().unwrap()), "");
        block_on(admin.call(
            Method::PATCH,
            &format!("/keys/tde/{}?force=true", old.rsplit('/').next().unwrap()),
            Some(json!({"attributes": {"enabled": false}})),
        ))
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(a.s.state()["state"], "Ready");
    a.psql("postgres", "insert into t values (99999)");
    assert!(a.s.stop().success());
    a.s.start(&[]);
    assert_eq!(a.s.state()["state"], "Ready");
    assert_eq!(a.psql("postgres", "select count(*) from t").trim(), "1021");
    assert!(a.s.stop().success());
}

#[test]
fn revoking_the_key_under_pgbench_loses_no_acknowledged_transaction() {
    let mut a = PgServer::create("pg-revoke-load");
    let VaultSetup {
        vault,
        client_id,
        ca,
        key_url,
        ..
    } = vault_for(&a);
    let dir = a.s.dir.to_str().unwrap().to_string();
    atrest_ok(&set_key_args(&dir, &key_url, &vault.tenant, &ca));
    atrest_ok(&[
        "server",
        "configure",
        "--data",
        &dir,
        "--key-check-interval-ms",
        "300",
    ]);
    a.s.start(&[]);
    a.run("pgbench", &["-i", "-s", "2", "-q", &a.conninfo("postgres")]);
    let logs = tempfile::tempdir().unwrap();
    let policy = |perms: &[&str]| {
        vault
            .admin_call(
                Method::PUT,
                &format!("/identities/{client_id}/policy"),
                Some(json!({"permissions": {"keys": perms}})),
            )
            .unwrap();
    };
    let mut acked = 0;
    for round in 0..3 {
        let prefix = format!("r{round}");
        let bench = Command::new(tool("pgbench"))
            .args(["-n", "-c", "4", "-j", "2", "-T", "60", "-l", "--log-prefix"])
            .arg(logs.path().join(&prefix))
            .arg(a.conninfo("postgres"))
            .env("PGPASSWORD", &a.password)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500 + 700 * round));
        // unwrapKey revoked mid-run: Inaccessible, every session ended.
        policy(&["get", "wrapKey"]);
        let st = wait_state(&a.s, "Inaccessible", Duration::from_millis(300 + 5000));
        assert!(
            st["reason"].as_str().unwrap().contains("permission"),
            "{st}"
        );
        let out = bench.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "round {round}: pgbench ran on after the key was revoked"
        );
        let n = logged_transactions(logs.path(), &prefix);
        assert!(
            n > 0,
            "round {round}: pgbench committed nothing before the revocation"
        );
        acked += n;
        // Revalidation is refused until the permission is back.
        let out = atrest(&["server", "revalidate", "--data", &dir]);
        assert!(
            !out.status.success(),
            "round {round}: revalidated before the fix"
        );
        policy(&["get", "wrapKey", "unwrapKey"]);
        atrest_ok(&["server", "revalidate", "--data", &dir]);
        assert_eq!(a.s.state()["state"], "Ready");
        pgbench_intact(&a, acked, &format!("round {round}"));
        eprintln!(
            "round {round}: {n} transactions acknowledged before the revocation, all present"
        );
    }
    assert!(a.s.stop().success());
}

/// Every DEK id (data layer and infrastructure layer) that a header slot
/// of a file of the tree names, the root file aside (its key wraps DEKs).
fn dek_ids(dir: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (p, b) in files_under(&dir.join("pgfs")) {
        if p.ends_with(atrest_fs::ROOT_FILE) {
            continue;
        }
        let slot = atrest_crypto::HEADER_SLOT_SIZE;
        for k in 0..2 {
            let Some(s) = b.get(k * slot..(k + 1) * slot) else {
                continue;
            };
            if let Ok(Some(u)) = atrest_crypto::FileHeader::decode_unverified(s) {
                let h = u.claims();
                out.insert(format!("{:?}", h.dek_id));
                if let Some(i) = &h.infra {
                    out.insert(format!("infra {:?}", i.dek_id));
                }
            }
        }
    }
    out
}

#[test]
fn dek_rotation_under_pgbench_with_kills_leaves_no_old_dek_and_loses_no_acknowledged_transaction() {
    let infra_tmp = tempfile::tempdir().unwrap();
    let infra = infra_tmp.path().join("infra");
    let mut a = PgServer::create_with(
        "pg-dekrot",
        &[
            "--infrastructure-encryption",
            "--infra-keystore",
            infra.to_str().unwrap(),
        ],
    );
    let dir = a.s.dir.to_str().unwrap().to_string();
    // Slow enough that the kills land mid-rotation (sped up at the end);
    // a resumed rotation runs at this configured rate.
    set_rotation_config(
        &a,
        json!({"pages_per_second": 100, "auto_at_seals": 1u64 << 31}),
    );
    a.s.start(&[]);
    a.run("pgbench", &["-i", "-s", "2", "-q", &a.conninfo("postgres")]);
    a.psql("postgres", "checkpoint");
    let old = dek_ids(&a.s.dir);
    assert!(old.len() > 100, "{} DEKs", old.len());
    assert!(old.iter().any(|d| d.starts_with("infra")), "both layers");
    let out = atrest_ok(&["server", "rotate-dek", "--data", &dir]);
    assert!(out.contains("cluster"), "{out}");
    // Progress shows in status and /metrics (once the rotation has
    // walked the tree and re-sealed its first units).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&atrest_ok(&["server", "status", "--data", &dir, "--json"]))
                .unwrap();
        let p = &status["dek_rotation"][0];
        assert_eq!(p["database"], "cluster", "{status}");
        if p["state"] == "rotating" && p["pages_done"].as_u64().unwrap() > 0 {
            assert!(p["pages_total"].as_u64().unwrap() > 1000, "{status}");
            break;
        }
        assert!(
            ["queued", "rotating"].contains(&p["state"].as_str().unwrap()),
            "{status}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "not rotating: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        a.s.http_get("/metrics")
            .contains("atrest_dek_rotation_pages_done{database=\"cluster\",state=\"rotating\"}"),
        "metrics"
    );
    let mut rounds = KillRounds::new();
    let mut mid_rotation = 0;
    for round in 0..20u32 {
        rounds.kill_under_pgbench(&mut a, round, |a| {
            if rotation_state(a) == "rotating" {
                mid_rotation += 1;
            }
        });
    }
    let acked = rounds.acked;
    eprintln!("{mid_rotation} of 20 kills landed while the rotation ran");
    assert!(mid_rotation >= 10, "only {mid_rotation} kills mid-rotation");
    // The rotation resumed after every kill; now at full speed to the end.
    let out = atrest_ok(&[
        "server",
        "rotate-dek",
        "--data",
        &dir,
        "--pages-per-second",
        "100000",
        "--wait",
    ]);
    assert!(out.contains("done"), "{out}");
    pgbench_intact(&a, acked, "after the rotation");
    assert!(a.s.stop().success());
    let now = dek_ids(&a.s.dir);
    let left: Vec<_> = now.intersection(&old).collect();
    assert!(left.is_empty(), "old DEKs still named: {left:?}");
    assert!(now.iter().any(|d| d.starts_with("infra")), "both layers");
    assert!(
        !a.s.dir.join("pgfs").join(atrest_fs::ROTATION_FILE).exists(),
        "the rotation's record is removed when it is done"
    );
    assert!(acked > 100, "only {acked} transactions acknowledged");
    a.s.start(&[]);
    pgbench_intact(&a, acked, "restarted");
    assert!(a.s.stop().success());
}

/// Sets `dek_rotation` in server.json (read at start).
fn set_rotation_config(a: &PgServer, v: serde_json::Value) {
    let path = a.s.dir.join("server.json");
    let mut c = a.config();
    c["dek_rotation"] = v;
    std::fs::write(path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
}

/// The cluster's rotation as the server last recorded it.
fn rotation_progress(a: &PgServer) -> serde_json::Value {
    let text = std::fs::read_to_string(a.s.dir.join("dek-rotation.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["databases"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["database"] == "cluster").cloned())
        .unwrap_or_default()
}

fn rotation_state(a: &PgServer) -> String {
    rotation_progress(a)["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_postgres_engine_dek_at_its_rotation_point_is_rotated_on_its_own() {
    let mut a = PgServer::create("pg-dekauto");
    a.s.start(&[]);
    a.run("pgbench", &["-i", "-s", "1", "-q", &a.conninfo("postgres")]);
    a.psql("postgres", "checkpoint");
    let old = dek_ids(&a.s.dir);
    assert!(a.s.stop().success());
    // A low rotation point stands in for 2^31 seals: the WAL's units are
    // re-sealed at every commit.
    set_rotation_config(
        &a,
        json!({"pages_per_second": 100000, "auto_at_seals": 2000}),
    );
    a.s.start(&[]);
    a.run(
        "pgbench",
        &["-n", "-c", "2", "-t", "1500", &a.conninfo("postgres")],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let p = rotation_progress(&a);
        if p["state"] == "done" {
            assert!(p["reason"].as_str().unwrap().contains("automatic"), "{p}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic rotation: {p}\n{}",
            a.s.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(a.s.log_text().contains("reached its rotation point"));
    pgbench_intact(&a, 3000, "after the automatic rotation");
    assert!(a.s.stop().success());
    let now = dek_ids(&a.s.dir);
    let left: Vec<_> = now.intersection(&old).collect();
    assert!(left.is_empty(), "old DEKs still named: {left:?}");
}

/// The newest backup's directory and the WAL archive of a server.
fn repo_paths(a: &PgServer, id: &str) -> (PathBuf, PathBuf) {
    let repo = a.s.dir.join("backups");
    (repo.join("backups").join(id), repo.join("pgwal"))
}

#[test]
fn an_online_backup_under_pgbench_is_sealed_verifies_and_follows_key_changes() {
    let mut a = PgServer::create("pg-backup");
    let dir = a.s.dir.to_str().unwrap().to_string();
    a.s.start(&[]);
    a.run("pgbench", &["-i", "-s", "2", "-q", &a.conninfo("postgres")]);
    let marker = format!("atrest-marker-{}", std::process::id());
    a.psql(
        "postgres",
        &format!(
            "create table m(v text); insert into m select '{marker}' from generate_series(1, 100)"
        ),
    );
    let mut bench = Command::new(tool("pgbench"))
        .args(["-n", "-c", "2", "-T", "20"])
        .arg(a.conninfo("postgres"))
        .env("PGPASSWORD", &a.password)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let out = atrest_ok(&["server", "backup", "--data", &dir]);
    let entry: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = entry["id"].as_str().unwrap().to_string();
    assert!(entry["postgres"]["start_lsn"].as_str().is_some(), "{entry}");
    assert!(
        entry["size_bytes"].as_u64().unwrap() > 10_000_000,
        "{entry}"
    );
    let _ = bench.wait();
    a.psql("postgres", "select pg_switch_wal()");
    let list: serde_json::Value =
        serde_json::from_str(&atrest_ok(&["server", "backup", "list", "--data", &dir])).unwrap();
    assert!(
        list["backups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["id"] == id.as_str()),
        "{list}"
    );
    let (backup, archive) = repo_paths(&a, &id);
    // Every unit of the copy, the label and the archived WAL authenticates.
    let out = atrest_ok(&["server", "backup", "verify", "--data", &dir]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v[0]["files"].as_u64().unwrap() > 100, "{v}");
    assert!(v[0]["archive_segments"].as_u64().unwrap() >= 1, "{v}");
    // Nothing in plaintext: not the marker rows, not the label.
    for d in [&backup, &archive] {
        let files = files_under(d);
        assert!(!files.is_empty(), "{}", d.display());
        for (p, b) in files {
            assert!(
                !contains(&b, marker.as_bytes()),
                "{} holds the marker",
                p.display()
            );
            assert!(
                !contains(&b, b"START WAL LOCATION"),
                "{} holds the label",
                p.display()
            );
        }
    }
    // A flipped bit in the copy fails verification, naming the file.
    let victim = files_under(&backup.join("tree"))
        .into_iter()
        .find(|(p, b)| b.len() > 40_000 && p.to_string_lossy().contains("base/"))
        .map(|(p, _)| p)
        .unwrap();
    let flip = |p: &Path| {
        let mut b = std::fs::read(p).unwrap();
        b[8192 + 16 + 100] ^= 1;
        std::fs::write(p, b).unwrap();
    };
    flip(&victim);
    let out = atrest(&["server", "backup", "verify", "--data", &dir]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&name) && err.contains("unit 0"), "{err}");
    flip(&victim);
    // A key change rewraps the backup's and the archive's headers too: the
    // service key can go.
    let service_key = a.config()["encryption"]["service_key"]
        .as_str()
        .unwrap()
        .to_string();
    let VaultSetup {
        vault,
        admin,
        ca,
        key_url,
        ..
    } = vault_for(&a);
    atrest_ok(&set_key_args(&dir, &key_url, &vault.tenant, &ca));
    let kid = latest_kid(&admin);
    let version = kid.rsplit('/').next().unwrap();
    for d in [backup.join("tree"), backup.join("sealed"), archive.clone()] {
        for (p, b) in files_under(&d) {
            if p.extension().is_some_and(|e| e == "tmp") {
                continue;
            }
            let h = &b[..b.len().min(8192)];
            assert!(
                contains(h, version.as_bytes()),
                "{} does not name {version}",
                p.display()
            );
            assert!(
                !contains(h, service_key.as_bytes()),
                "{} still names the service key",
                p.display()
            );
        }
    }
    // Verified offline too, through the customer key.
    assert!(a.s.stop().success());
    let out = atrest_ok(&["server", "backup", "verify", "--data", &dir]);
    assert!(out.contains(&id), "{out}");
    // While stopped, a backup cannot be taken, and says why.
    let out = atrest(&["server", "backup", "--data", &dir]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("online"));
}
