//! The server's persistent store: SQLite in the data dir (agents, tasks, phases) and the
//! log archive beside it (`logs/<task_id>/<phase>.log`).
//!
//! "Nothing lost once the server said 2xx": WAL mode with `synchronous=FULL`, one
//! connection behind a mutex (one writer, short transactions), and a log file is written
//! to a temporary name, fsynced and renamed, then recorded; an upload that breaks half
//! way leaves nothing visible.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::util::Sha256;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::lifecycle::{Outcome, TaskRecord};
use crate::protocol::{
    Action, AgentState, AgentView, Labels, NewTask, Phase, RegisterRequest, TaskData, TaskStatus,
};

/// A store failure: always the server's fault, never the client's.
#[derive(Debug)]
pub(crate) enum StoreError {
    Db(rusqlite::Error),
    Io(io::Error),
    Corrupt(String),
    /// An upload whose bytes do not match the checksum it came with.
    Mismatch(String),
    /// A revoked agent tried to register again.
    Revoked(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Db(e) => write!(f, "database: {e}"),
            StoreError::Io(e) => write!(f, "log archive: {e}"),
            StoreError::Corrupt(s) => write!(f, "stored data is damaged: {s}"),
            StoreError::Mismatch(s) | StoreError::Revoked(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e)
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::Io(e)
    }
}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

/// A registered agent as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AgentRow {
    pub agent_id: String,
    pub name: String,
    pub hostname: String,
    pub version: String,
    pub plan_limit: u32,
    pub labels: Labels,
    pub last_seen: Option<String>,
    pub revoked_at: Option<String>,
}

impl AgentRow {
    /// The API view of an agent that is not connected.
    pub fn offline_view(&self) -> AgentView {
        AgentView {
            agent_id: self.agent_id.clone(),
            name: self.name.clone(),
            hostname: self.hostname.clone(),
            version: self.version.clone(),
            online: false,
            state: AgentState {
                plan_running_count: 0,
                plan_limit: self.plan_limit,
                apply_running: false,
                draining: false,
                spool_full: false,
            },
            running: Vec::new(),
            labels: self.labels.clone(),
            last_seen: self.last_seen.clone(),
            revoked_at: self.revoked_at.clone(),
        }
    }
}

/// A queued task, as dispatch sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Queued {
    pub task_id: String,
    pub action: Action,
    pub labels: Labels,
}

pub(crate) struct Store {
    conn: Mutex<Connection>,
    logs: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    version TEXT NOT NULL,
    plan_limit INTEGER NOT NULL,
    labels TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    last_seen TEXT
);
CREATE INDEX IF NOT EXISTS agents_token ON agents(token_hash);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE,
    action TEXT NOT NULL,
    status TEXT NOT NULL,
    agent_id TEXT,
    labels TEXT NOT NULL,
    tf_json TEXT NOT NULL,
    variables TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    exit_code INTEGER,
    phases TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status, seq);
";

const TASK_COLUMNS: &str = "task_id, action, status, agent_id, labels, created_at, started_at, finished_at, exit_code, phases, timeout_s, sensitive";

fn corrupt<E: fmt::Display>(what: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Corrupt(format!("{what}: {e}"))
}

fn task_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TaskRecord>> {
    let action: String = row.get(1)?;
    let status: String = row.get(2)?;
    let labels: String = row.get(4)?;
    let phases: String = row.get(9)?;
    let id: String = row.get(0)?;
    let agent_id: Option<String> = row.get(3)?;
    let created_at: String = row.get(5)?;
    let started_at: Option<String> = row.get(6)?;
    let finished_at: Option<String> = row.get(7)?;
    let exit_code: Option<i32> = row.get(8)?;
    let timeout_s: Option<i64> = row.get(10)?;
    let sensitive: Option<String> = row.get(11)?;
    Ok((|| {
        Ok(TaskRecord {
            action: serde_json::from_value(serde_json::Value::String(action))
                .map_err(corrupt("task action"))?,
            status: TaskStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("task status {status:?}")))?,
            labels: serde_json::from_str(&labels).map_err(corrupt("task labels"))?,
            phases: serde_json::from_str(&phases).map_err(corrupt("task phases"))?,
            task_id: id,
            agent_id,
            created_at,
            started_at,
            finished_at,
            exit_code,
            timeout_s: timeout_s.map(|t| t.max(0) as u64),
            sensitive_variables: match sensitive {
                Some(s) => serde_json::from_str(&s).map_err(corrupt("sensitive variables"))?,
                None => Vec::new(),
            },
        })
    })())
}

fn agent_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<AgentRow>> {
    let labels: String = row.get(5)?;
    let row = AgentRow {
        agent_id: row.get(0)?,
        name: row.get(1)?,
        hostname: row.get(2)?,
        version: row.get(3)?,
        plan_limit: row.get(4)?,
        labels: Labels::new(),
        last_seen: row.get(6)?,
        revoked_at: row.get(7)?,
    };
    Ok(serde_json::from_str(&labels)
        .map(|labels| AgentRow { labels, ..row })
        .map_err(corrupt("agent labels")))
}

const AGENT_COLUMNS: &str =
    "agent_id, name, hostname, version, plan_limit, labels, last_seen, revoked_at";

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl Store {
    /// Opens (or creates) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store> {
        fs::create_dir_all(data_dir)?;
        let logs = data_dir.join("logs");
        fs::create_dir_all(&logs)?;
        let conn = Connection::open(data_dir.join("iac.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            logs,
        })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions
        // roll back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds the write-ahead log into the database file (at shutdown: a tidy data dir).
    pub fn checkpoint(&self) -> Result<()> {
        self.db().execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        Ok(())
    }

    // ---- agents ----

    /// Registers an agent, or re-registers one of the same name (same id, new token).
    pub fn register_agent(
        &self,
        req: &RegisterRequest,
        token_hash: &str,
        now: &str,
    ) -> Result<String> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let existing: Option<(String, Option<String>)> = tx
            .query_row(
                "SELECT agent_id, revoked_at FROM agents WHERE name = ?1",
                [&req.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((id, Some(at))) = &existing {
            return Err(StoreError::Revoked(format!(
                "agent {} ({id}) was revoked at {at}; an administrator must delete it before the name can register again",
                req.name
            )));
        }
        let existing = existing.map(|(id, _)| id);
        let labels = to_json(&req.labels);
        let id =
            match existing {
                Some(id) => {
                    tx.execute(
                    "UPDATE agents SET hostname = ?2, version = ?3, plan_limit = ?4, labels = ?5,
                     token_hash = ?6, last_seen = ?7 WHERE agent_id = ?1",
                    params![id, req.hostname, req.version, req.plan_limit, labels, token_hash, now],
                )?;
                    id
                }
                None => {
                    let tmp = format!("new-{token_hash}");
                    tx.execute(
                        "INSERT INTO agents (agent_id, name, hostname, version, plan_limit, labels,
                     token_hash, registered_at, last_seen) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?8)",
                        params![
                            tmp,
                            req.name,
                            req.hostname,
                            req.version,
                            req.plan_limit,
                            labels,
                            token_hash,
                            now
                        ],
                    )?;
                    let id = format!("A-{:06}", tx.last_insert_rowid());
                    tx.execute(
                        "UPDATE agents SET agent_id = ?1 WHERE agent_id = ?2",
                        params![id, tmp],
                    )?;
                    id
                }
            };
        tx.commit()?;
        Ok(id)
    }

    /// The agent whose token hashes to `token_hash`.
    pub fn agent_by_token(&self, token_hash: &str) -> Result<Option<AgentRow>> {
        let db = self.db();
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE token_hash = ?1");
        db.query_row(&sql, [token_hash], agent_from_row)
            .optional()?
            .transpose()
    }

    pub fn agents(&self) -> Result<Vec<AgentRow>> {
        let db = self.db();
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name");
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map([], agent_from_row)?;
        rows.map(|r| r?).collect()
    }

    /// Revokes an agent: its token stops working at once, and its name cannot register
    /// again. `false` when there is no such agent.
    pub fn revoke_agent(&self, agent_id: &str, now: &str) -> Result<bool> {
        let poison = format!(
            "revoked-{}",
            crate::util::hex(&crate::util::random_bytes(16)?)
        );
        let n = self.db().execute(
            "UPDATE agents SET token_hash = ?2, revoked_at = COALESCE(revoked_at, ?3) WHERE agent_id = ?1",
            params![agent_id, poison, now],
        )?;
        Ok(n > 0)
    }

    pub fn set_last_seen(&self, agent_id: &str, now: &str) -> Result<()> {
        self.db().execute(
            "UPDATE agents SET last_seen = ?2 WHERE agent_id = ?1",
            params![agent_id, now],
        )?;
        Ok(())
    }

    // ---- tasks ----

    /// Stores a new queued task and returns it.
    pub fn create_task(&self, task: &NewTask, now: &str) -> Result<TaskRecord> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let tmp = format!("new-{}", crate::util::hex(&crate::util::random_bytes(16)?));
        let mut rec = TaskRecord::new(tmp.clone(), task.action, task.labels.clone(), now);
        rec.timeout_s = task.timeout_s;
        rec.sensitive_variables = task.sensitive_variables.clone();
        tx.execute(
            "INSERT INTO tasks (task_id, action, status, labels, tf_json, variables, created_at, phases, timeout_s, sensitive)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                tmp,
                task.action.as_str(),
                rec.status.as_str(),
                to_json(&rec.labels),
                task.tf_json,
                task.variables,
                now,
                to_json(&rec.phases),
                task.timeout_s.map(|t| t as i64),
                to_json(&task.sensitive_variables)
            ],
        )?;
        rec.task_id = format!("T-{:06}", tx.last_insert_rowid());
        tx.execute(
            "UPDATE tasks SET task_id = ?1 WHERE task_id = ?2",
            params![rec.task_id, tmp],
        )?;
        tx.commit()?;
        Ok(rec)
    }

    pub fn task(&self, task_id: &str) -> Result<Option<TaskRecord>> {
        load_task(&self.db(), task_id)
    }

    /// Tasks, newest first, optionally only those of one status.
    pub fn tasks(&self, status: Option<TaskStatus>, limit: u32) -> Result<Vec<TaskRecord>> {
        let db = self.db();
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE (?1 IS NULL OR status = ?1) ORDER BY seq DESC LIMIT ?2"
        );
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(params![status.map(|s| s.as_str()), limit], task_from_row)?;
        rows.map(|r| r?).collect()
    }

    /// Queued tasks, oldest first.
    pub fn queued(&self) -> Result<Vec<Queued>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT task_id, action, labels FROM tasks WHERE status = 'queued' ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |row| {
            let id: String = row.get(0)?;
            let action: String = row.get(1)?;
            let labels: String = row.get(2)?;
            Ok((id, action, labels))
        })?;
        rows.map(|r| {
            let (task_id, action, labels) = r?;
            Ok(Queued {
                task_id,
                action: serde_json::from_value(serde_json::Value::String(action))
                    .map_err(corrupt("task action"))?,
                labels: serde_json::from_str(&labels).map_err(corrupt("task labels"))?,
            })
        })
        .collect()
    }

    /// What `run_task` carries for a task.
    pub fn task_data(&self, task_id: &str) -> Result<Option<TaskData>> {
        let db = self.db();
        db.query_row(
            "SELECT action, tf_json, variables, timeout_s, sensitive FROM tasks WHERE task_id = ?1",
            [task_id],
            |row| {
                let action: String = row.get(0)?;
                let timeout: Option<i64> = row.get(3)?;
                let sensitive: Option<String> = row.get(4)?;
                Ok((action, row.get(1)?, row.get(2)?, timeout, sensitive))
            },
        )
        .optional()?
        .map(|(action, tf_json, variables, timeout, sensitive)| {
            Ok(TaskData {
                task_id: task_id.to_string(),
                action: serde_json::from_value(serde_json::Value::String(action))
                    .map_err(corrupt("task action"))?,
                tf_json,
                variables,
                timeout_s: timeout.map(|t| t.max(0) as u64),
                sensitive_variables: match sensitive {
                    Some(s) => serde_json::from_str(&s).map_err(corrupt("sensitive variables"))?,
                    None => Vec::new(),
                },
            })
        })
        .transpose()
    }

    /// Loads a task, applies `f` to it, and saves it if it changed, in one transaction.
    /// `None` when there is no such task.
    pub fn update_task(
        &self,
        task_id: &str,
        f: impl FnOnce(&mut TaskRecord) -> Outcome,
    ) -> Result<Option<(Outcome, TaskRecord)>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let Some(mut rec) = load_task(&tx, task_id)? else {
            return Ok(None);
        };
        let outcome = f(&mut rec);
        if outcome == Ok(super::lifecycle::Change::Changed) {
            save_task(&tx, &rec)?;
            tx.commit()?;
        }
        Ok(Some((outcome, rec)))
    }

    // ---- logs ----

    fn log_path(&self, task_id: &str, phase: Phase) -> PathBuf {
        // `task_id` passed `valid_task_id`: no separators, not `.` or `..`.
        self.logs
            .join(task_id)
            .join(format!("{}.log", phase.as_str()))
    }

    /// Writes a phase's log from `body` (exactly `len` bytes, whose hex SHA-256 is
    /// `sha256` when given), durably, then records its size. Replaces an earlier upload
    /// of the same phase. A body that is short or does not match leaves nothing behind.
    pub fn save_log(
        &self,
        task_id: &str,
        phase: Phase,
        body: &mut dyn Read,
        len: u64,
        sha256: Option<&str>,
    ) -> Result<u64> {
        let path = self.log_path(task_id, phase);
        let dir = path.parent().unwrap_or(&self.logs).to_path_buf();
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            phase.as_str(),
            crate::util::hex(&crate::util::random_bytes(8)?)
        ));
        let written = (|| -> Result<u64> {
            let mut f = HashingWriter {
                file: File::create(&tmp)?,
                hasher: Sha256::default(),
            };
            let n = io::copy(&mut body.take(len), &mut f)?;
            if n != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the body ended after {n} of {len} bytes"),
                )
                .into());
            }
            let got = f.hasher.hex();
            if let Some(want) = sha256 {
                if !got.eq_ignore_ascii_case(want.trim()) {
                    return Err(StoreError::Mismatch(format!(
                        "the log's SHA-256 is {got}, not {want} as announced: it was damaged on the way"
                    )));
                }
            }
            f.file.flush()?;
            f.file.sync_all()?;
            Ok(n)
        })();
        let n = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, &path)?;
        File::open(&dir)?.sync_all()?;
        self.update_task(task_id, |rec| {
            rec.set_log_bytes(phase, n);
            Ok(super::lifecycle::Change::Changed)
        })?;
        Ok(n)
    }

    /// The whole archived log of a phase, if it was uploaded.
    pub fn read_log(&self, task_id: &str, phase: Phase) -> Result<Option<Vec<u8>>> {
        match fs::read(self.log_path(task_id, phase)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The archived log of a phase, if it was uploaded.
    pub fn open_log(&self, task_id: &str, phase: Phase) -> Result<Option<(File, u64)>> {
        match File::open(self.log_path(task_id, phase)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// A file writer that hashes what goes through it.
struct HashingWriter {
    file: File,
    hasher: Sha256,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Columns added after the first release, for stores created before them.
fn migrate(conn: &Connection) -> Result<()> {
    let has = |table: &str, column: &str| -> Result<bool> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
        for n in names {
            if n? == column {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if !has("tasks", "timeout_s")? {
        conn.execute_batch("ALTER TABLE tasks ADD COLUMN timeout_s INTEGER")?;
    }
    if !has("tasks", "sensitive")? {
        conn.execute_batch("ALTER TABLE tasks ADD COLUMN sensitive TEXT")?;
    }
    if !has("agents", "revoked_at")? {
        conn.execute_batch("ALTER TABLE agents ADD COLUMN revoked_at TEXT")?;
    }
    Ok(())
}

fn load_task(db: &Connection, task_id: &str) -> Result<Option<TaskRecord>> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = ?1");
    db.query_row(&sql, [task_id], task_from_row)
        .optional()?
        .transpose()
}

fn save_task(tx: &Transaction<'_>, rec: &TaskRecord) -> Result<()> {
    tx.execute(
        "UPDATE tasks SET status = ?2, agent_id = ?3, started_at = ?4, finished_at = ?5,
         exit_code = ?6, phases = ?7 WHERE task_id = ?1",
        params![
            rec.task_id,
            rec.status.as_str(),
            rec.agent_id,
            rec.started_at,
            rec.finished_at,
            rec.exit_code,
            to_json(&rec.phases)
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::lifecycle::Change;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "iac-store-{name}-{}",
            crate::util::hex(&crate::util::random_bytes(6).unwrap())
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn new_task(action: Action) -> NewTask {
        NewTask {
            action,
            tf_json: "{}".into(),
            variables: "{}".into(),
            labels: Labels::new(),
            timeout_s: None,
            sensitive_variables: Vec::new(),
        }
    }

    #[test]
    fn tasks_survive_reopening() {
        let dir = temp_dir("reopen");
        let id = {
            let s = Store::open(&dir).unwrap();
            let t = s.create_task(&new_task(Action::Apply), "t0").unwrap();
            assert_eq!(t.task_id, "T-000001");
            s.update_task(&t.task_id, |r| r.accept("A-1", "t1"))
                .unwrap();
            t.task_id
        };
        let s = Store::open(&dir).unwrap();
        let t = s.task(&id).unwrap().unwrap();
        assert_eq!(t.status, TaskStatus::Running);
        assert_eq!(t.agent_id.as_deref(), Some("A-1"));
        assert_eq!(
            s.create_task(&new_task(Action::Plan), "t2")
                .unwrap()
                .task_id,
            "T-000002"
        );
        assert_eq!(s.queued().unwrap().len(), 1);
        let newest_first: Vec<_> = s
            .tasks(None, 10)
            .unwrap()
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        assert_eq!(newest_first, ["T-000002", "T-000001"]);
        assert_eq!(s.tasks(Some(TaskStatus::Running), 10).unwrap().len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refused_updates_are_not_saved() {
        let dir = temp_dir("refused");
        let s = Store::open(&dir).unwrap();
        let t = s.create_task(&new_task(Action::Plan), "t0").unwrap();
        let (outcome, _) = s
            .update_task(&t.task_id, |r| {
                r.finish("A-1", crate::protocol::FinalStatus::Failed, None, "t")
            })
            .unwrap()
            .unwrap();
        assert!(outcome.is_err());
        assert_eq!(
            s.task(&t.task_id).unwrap().unwrap().status,
            TaskStatus::Queued
        );
        assert!(s
            .update_task("T-999999", |_| Ok(Change::Changed))
            .unwrap()
            .is_none());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn agents_reregister_with_same_id_and_new_token() {
        let dir = temp_dir("agents");
        let s = Store::open(&dir).unwrap();
        let req = RegisterRequest {
            name: "a".into(),
            hostname: "h".into(),
            version: "0".into(),
            plan_limit: 2,
            labels: Labels::new(),
        };
        let id = s.register_agent(&req, "hash1", "t0").unwrap();
        assert_eq!(s.register_agent(&req, "hash2", "t1").unwrap(), id);
        assert!(s.agent_by_token("hash1").unwrap().is_none());
        assert_eq!(s.agent_by_token("hash2").unwrap().unwrap().agent_id, id);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn logs_are_atomic_and_replaceable() {
        let dir = temp_dir("logs");
        let s = Store::open(&dir).unwrap();
        let t = s.create_task(&new_task(Action::Plan), "t0").unwrap();
        // A body shorter than announced leaves nothing behind.
        let err = s.save_log(&t.task_id, Phase::Plan, &mut &b"short"[..], 100, None);
        assert!(err.is_err());
        assert!(s.open_log(&t.task_id, Phase::Plan).unwrap().is_none());
        assert_eq!(
            fs::read_dir(dir.join("logs").join(&t.task_id))
                .unwrap()
                .count(),
            0
        );
        s.save_log(&t.task_id, Phase::Plan, &mut &b"first"[..], 5, None)
            .unwrap();
        // A checksum that does not match keeps the earlier upload.
        let bad = s.save_log(&t.task_id, Phase::Plan, &mut &b"second!"[..], 7, Some("00"));
        assert!(matches!(bad, Err(StoreError::Mismatch(_))));
        let (mut f, _) = s.open_log(&t.task_id, Phase::Plan).unwrap().unwrap();
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        assert_eq!(text, "first");
        let sha = crate::util::sha256_hex(b"second!");
        s.save_log(&t.task_id, Phase::Plan, &mut &b"second!"[..], 7, Some(&sha))
            .unwrap();
        let (mut f, len) = s.open_log(&t.task_id, Phase::Plan).unwrap().unwrap();
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        assert_eq!((text.as_str(), len), ("second!", 7));
        assert_eq!(
            s.task(&t.task_id).unwrap().unwrap().phases["plan"].log_bytes,
            Some(7)
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
