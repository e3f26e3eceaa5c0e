//! Persistent adapter cache: one SQLite database (WAL) of rows keyed by the description
//! embedding, the bundle hash and the generation options, and one adapter directory per row.
//!
//! Invariants: a row is inserted only after its adapter files are durable; on open, rows whose
//! directory is missing or incomplete are dropped and directories without a row are removed; a
//! hit re-checks the weights' SHA-256 and a mismatch drops the row (the caller regenerates).
//!
//! Every row has an owner, the uid of the caller it was generated for. The cache is private to
//! the service (the database file 0600, the adapter directory reachable by the service user
//! alone): callers get their adapters as file descriptors, never by path. Past the byte budget,
//! the least recently used adapter of the owner holding the most bytes goes first, so one
//! caller's flood of misses evicts its own adapters, not the others'.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use sglora::{sha256_hex, AdapterFiles, Description, CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE};

use crate::error::{Error, Result};
use crate::index::EmbeddingIndex;

/// Current schema version (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// A cached adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Adapter id (directory name).
    pub id: String,
    /// The uid of the caller it was generated for.
    pub owner: u32,
    /// Adapter directory.
    pub dir: PathBuf,
    /// The description it was generated for.
    pub description: String,
    /// Bytes on disk.
    pub bytes: u64,
    /// Hex SHA-256 of the weights file, as recorded and (on a hit) just verified.
    pub weights_sha256: String,
    /// `provenance.json` contents.
    pub provenance: String,
}

/// One row as the administrator sees it: (id, owner uid, bytes, last used in ms since the
/// epoch, hits). No description.
pub type Listed = (String, u32, u64, i64, u64);

/// What [`Cache::touch_verified`] found.
enum Verified {
    /// The row, its files intact.
    Intact(Entry),
    /// No such row.
    Missing,
    /// The files did not match the recorded hash; the row and files are gone now.
    Damaged,
}

/// How a lookup matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Same text.
    Exact,
    /// A different text whose embedding is within the threshold.
    Similar,
}

/// Cache statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Cached adapters (rows of the database).
    pub entries: u64,
    /// Bytes of adapter files.
    pub bytes: u64,
}

/// The cache.
pub struct Cache {
    db: Connection,
    dir: PathBuf,
    max_bytes: u64,
    threshold: f64,
    /// A random key of this cache's, so that an id cannot be computed from a guessed
    /// description (ids are keyed hashes of the scope and the text).
    id_key: String,
    index: HashMap<String, EmbeddingIndex>,
    stats: Stats,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.dir)
            .field("entries", &self.stats.entries)
            .finish()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn db_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::Database {
        path: path.to_path_buf(),
        message: e.to_string(),
        hint: writable_hint(path),
    }
}

/// `.db(path)?`: a SQLite result as the cache's error, naming the database file.
trait Db<T> {
    fn db(self, path: &Path) -> Result<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self, path: &Path) -> Result<T> {
        self.map_err(|e| db_err(path, e))
    }
}

/// Why a database may not be writable, in words (empty if it looks writable).
fn writable_hint(path: &Path) -> String {
    use nix::unistd::{access, AccessFlags};
    let dir = path.parent().unwrap_or(Path::new("."));
    for p in [path, dir] {
        match access(p, AccessFlags::W_OK) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOENT) => {}
            Err(nix::errno::Errno::EROFS) => {
                return format!(
                    " ({} is on a read-only file system; the state directory must be writable)",
                    p.display()
                )
            }
            Err(e) => {
                return format!(
                    " ({} is not writable: {e}; the state directory must be writable by the service user)",
                    p.display()
                )
            }
        }
    }
    String::new()
}

fn emb_to_blob(v: &[f32]) -> Vec<u8> {
    sglora::f32s_to_le(v)
}

fn blob_to_emb(b: &[u8]) -> Vec<f32> {
    sglora::f32s_from_le(b).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn dir_bytes(dir: &Path) -> u64 {
    [WEIGHTS_FILE, CONFIG_FILE, PROVENANCE_FILE]
        .iter()
        .filter_map(|f| fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

impl Cache {
    /// Open (creating if needed) the database at `db_path` and the adapter directory `dir`,
    /// migrate the schema and reconcile rows with files.
    pub fn open(db_path: &Path, dir: &Path, max_bytes: u64, threshold: f64) -> Result<Cache> {
        fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        if let Some(p) = db_path.parent() {
            fs::create_dir_all(p).map_err(|e| Error::io("creating", p, e))?;
        }
        // A database that cannot be made private here (a read-only state directory) is left to
        // SQLite, whose error then says why it cannot be written.
        if let Err(e) = private_file(db_path) {
            crate::log::warn(&format!("cache: {e}"));
        }
        let db = Connection::open(db_path).db(db_path)?;
        db.busy_timeout(std::time::Duration::from_secs(5))
            .db(db_path)?;
        let check: String = db
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .db(db_path)?;
        if check != "ok" {
            return Err(Error::Database {
                path: db_path.into(),
                message: format!(
                    "it is corrupt ({check}); move it away and restart to rebuild the cache"
                ),
                hint: String::new(),
            });
        }
        db.pragma_update(None, "journal_mode", "WAL").db(db_path)?;
        db.pragma_update(None, "synchronous", "FULL").db(db_path)?;
        let version: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .db(db_path)?;
        if version > SCHEMA_VERSION {
            return Err(Error::Database {
                path: db_path.into(),
                message: format!("schema version {version} is newer than this sglora ({SCHEMA_VERSION}); upgrade sglora"),
                hint: String::new(),
            });
        }
        if version < 1 {
            db.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS adapters(
                   id TEXT PRIMARY KEY,
                   text_sha TEXT NOT NULL,
                   scope TEXT NOT NULL,
                   embedding BLOB NOT NULL,
                   description TEXT NOT NULL,
                   bytes INTEGER NOT NULL,
                   weights_sha256 TEXT NOT NULL,
                   provenance TEXT NOT NULL,
                   created INTEGER NOT NULL,
                   last_used INTEGER NOT NULL,
                   hits INTEGER NOT NULL DEFAULT 0);
                 CREATE INDEX IF NOT EXISTS adapters_text ON adapters(text_sha, scope);
                 CREATE INDEX IF NOT EXISTS adapters_lru ON adapters(last_used);
                 PRAGMA user_version = 1;
                 COMMIT;",
            )
            .db(db_path)?;
        }
        if version < 2 {
            // Version 1 rows have no owner and their scopes name none, so no request could match
            // them again: they go (start-up reconciliation removes their directories).
            db.execute_batch(
                "BEGIN;
                 DELETE FROM adapters;
                 ALTER TABLE adapters ADD COLUMN owner INTEGER NOT NULL DEFAULT -1;
                 CREATE INDEX IF NOT EXISTS adapters_owner ON adapters(owner, last_used);
                 PRAGMA user_version = 2;
                 COMMIT;",
            )
            .db(db_path)?;
        }
        // SQLite gives its -wal and -shm files the database's mode, but files from an older
        // version may be group-readable: the whole cache is the service's alone.
        for suffix in ["", "-wal", "-shm"] {
            let mut p = db_path.as_os_str().to_owned();
            p.push(suffix);
            if let Err(e) = private_file_if_exists(Path::new(&p)) {
                crate::log::warn(&format!("cache: {e}"));
            }
        }
        let id_key = id_key(&db).db(db_path)?;
        let mut cache = Cache {
            db,
            dir: dir.to_path_buf(),
            max_bytes,
            id_key,
            threshold,
            index: HashMap::new(),
            stats: Stats::default(),
        };
        cache.reconcile()?;
        Ok(cache)
    }

    /// The directory holding the adapter directories (the service's alone).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn db_path(&self) -> PathBuf {
        self.db.path().map(PathBuf::from).unwrap_or_default()
    }

    /// Drop rows without complete files, remove directories without rows, rebuild the index.
    fn reconcile(&mut self) -> Result<()> {
        let dbp = self.db_path();
        let rows: Vec<(String, String, Vec<u8>)> = {
            let mut st = self
                .db
                .prepare("SELECT id, scope, embedding FROM adapters")
                .db(&dbp)?;
            let it = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .db(&dbp)?;
            it.collect::<std::result::Result<_, _>>().db(&dbp)?
        };
        let mut known = std::collections::HashSet::new();
        self.index.clear();
        for (id, scope, emb) in rows {
            let d = self.dir.join(&id);
            if [WEIGHTS_FILE, CONFIG_FILE, PROVENANCE_FILE]
                .iter()
                .all(|f| d.join(f).is_file())
            {
                self.index
                    .entry(scope)
                    .or_default()
                    .insert(&id, &blob_to_emb(&emb));
                known.insert(id);
            } else {
                self.db
                    .execute("DELETE FROM adapters WHERE id = ?1", params![id])
                    .db(&dbp)?;
            }
        }
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    let p = e.path();
                    // Never follow a symlink out of the cache directory: remove the link itself.
                    match fs::symlink_metadata(&p) {
                        Ok(m) if m.is_dir() => {
                            let _ = fs::remove_dir_all(&p);
                        }
                        Ok(_) => {
                            let _ = fs::remove_file(&p);
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        self.stats = self.count()?;
        Ok(())
    }

    /// Look up by exact text first, then by nearest embedding within `scope` (bundle + options).
    /// `embedding` may be `None` to try the exact text only.
    pub fn lookup(
        &mut self,
        description: &Description,
        scope: &str,
        embedding: Option<&[f32]>,
    ) -> Result<Option<(Entry, Match)>> {
        self.lookup_where(description, scope, embedding, |_| true)
    }

    /// [`Cache::lookup`], where a near-duplicate (another text) is only a match if `serves`
    /// accepts its `provenance.json` contents; one it refuses is neither served nor counted as
    /// used.
    pub fn lookup_where(
        &mut self,
        description: &Description,
        scope: &str,
        embedding: Option<&[f32]>,
        serves: impl Fn(&str) -> bool,
    ) -> Result<Option<(Entry, Match)>> {
        let dbp = self.db_path();
        let exact: Option<String> = self
            .db
            .query_row(
                "SELECT id FROM adapters WHERE text_sha = ?1 AND scope = ?2",
                params![description.sha256(), scope],
                |r| r.get(0),
            )
            .optional()
            .db(&dbp)?;
        if let Some(id) = exact {
            if let Verified::Intact(e) = self.touch_verified(&id)? {
                return Ok(Some((e, Match::Exact)));
            }
        }
        let Some(q) = embedding else { return Ok(None) };
        let candidates: Vec<String> = match self.index.get(scope) {
            Some(ix) => ix
                .candidates(q, self.threshold)
                .into_iter()
                .map(String::from)
                .collect(),
            None => Vec::new(),
        };
        // Exact scores of the (few) candidates, best first.
        let mut scored = Vec::with_capacity(candidates.len());
        for id in candidates {
            let row: Option<(Vec<u8>, String)> = self
                .db
                .query_row(
                    "SELECT embedding, provenance FROM adapters WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .db(&dbp)?;
            if let Some((b, provenance)) = row {
                let e = blob_to_emb(&b);
                if e.len() == q.len() && serves(&provenance) {
                    let sim = dot(q, &e);
                    if sim >= self.threshold {
                        scored.push((sim, id));
                    }
                }
            }
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, id) in scored {
            if let Verified::Intact(e) = self.touch_verified(&id)? {
                return Ok(Some((e, Match::Similar)));
            }
        }
        Ok(None)
    }

    /// Fetch a row, check its files (weights hash), bump its LRU time; drop it if damaged.
    fn touch_verified(&mut self, id: &str) -> Result<Verified> {
        let dbp = self.db_path();
        let row: Option<(String, i64, String, String, i64)> = self
            .db
            .query_row(
                "SELECT description, bytes, weights_sha256, provenance, owner FROM adapters WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .db(&dbp)?;
        let Some((description, bytes, sha, provenance, owner)) = row else {
            return Ok(Verified::Missing);
        };
        let dir = self.dir.join(id);
        let intact = fs::read(dir.join(WEIGHTS_FILE))
            .map(|w| sha256_hex(&w) == sha)
            .unwrap_or(false)
            && dir.join(CONFIG_FILE).is_file()
            && dir.join(PROVENANCE_FILE).is_file();
        if !intact {
            crate::log::warn(&format!(
                "cache: adapter {id}'s files do not match their recorded SHA-256; removed"
            ));
            self.remove(id)?;
            return Ok(Verified::Damaged);
        }
        // The LRU bump is bookkeeping: if the database is locked or read-only the adapter is
        // still served.
        if let Err(e) = self.db.execute(
            "UPDATE adapters SET last_used = ?1, hits = hits + 1 WHERE id = ?2",
            params![now(), id],
        ) {
            crate::log::warn(&format!("cache: cannot record a hit of {id}: {e}"));
        }
        Ok(Verified::Intact(Entry {
            id: id.to_string(),
            owner: u32::try_from(owner).unwrap_or(u32::MAX),
            dir,
            description,
            bytes: bytes as u64,
            weights_sha256: sha,
            provenance,
        }))
    }

    /// Get an entry by id (verified).
    pub fn get(&mut self, id: &str) -> Result<Option<Entry>> {
        self.get_owned(id, None)
    }

    /// Get an entry by id if `owner` (when given) owns it: another owner's row is `None` at
    /// once, without reading its files or touching its use counts, so a probe tells nothing
    /// by its timing and changes nothing. An entry whose files no longer match their SHA-256
    /// is removed and reported as [`Error::Damaged`].
    pub fn get_owned(&mut self, id: &str, owner: Option<u32>) -> Result<Option<Entry>> {
        if !is_valid_id(id) {
            return Ok(None);
        }
        if let Some(want) = owner {
            let dbp = self.db_path();
            let has: Option<i64> = self
                .db
                .query_row(
                    "SELECT owner FROM adapters WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .db(&dbp)?;
            if has != Some(i64::from(want)) {
                return Ok(None);
            }
        }
        match self.touch_verified(id)? {
            Verified::Intact(e) => Ok(Some(e)),
            Verified::Missing => Ok(None),
            Verified::Damaged => Err(Error::Damaged { id: id.to_string() }),
        }
    }

    /// Store a freshly generated adapter for `owner`: write its files atomically under the cache
    /// directory, then insert the row, then evict beyond the byte budget ([`Cache::evict_to_budget`]).
    pub fn insert(
        &mut self,
        description: &Description,
        scope: &str,
        owner: u32,
        embedding: &[f32],
        files: &AdapterFiles,
    ) -> Result<Entry> {
        let dbp = self.db_path();
        let (text, text_sha) = (description.text(), description.sha256());
        let id = sha256_hex(format!("{}\u{0}{scope}\u{0}{text_sha}", self.id_key).as_bytes())[..24]
            .to_string();
        let dir = self.dir.join(&id);
        let old = self.row_bytes(&id)?;
        // Unreachable through the 0700 cache directory; private themselves too (0700/0600 from
        // their creation), so a mistaken chmod of the parent exposes nothing.
        sglora::write_atomic_with(&dir, files, true, |_| Ok(()))?;
        let bytes = dir_bytes(&dir);
        let t = now();
        let inserted = self.db.execute(
            "INSERT OR REPLACE INTO adapters(id, text_sha, scope, embedding, description, bytes, weights_sha256, provenance, created, last_used, hits, owner)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, 0, ?10)",
            params![id, text_sha, scope, emb_to_blob(embedding), text, bytes as i64, files.weights_sha256, String::from_utf8_lossy(&files.provenance), t, i64::from(owner)],
        );
        if let Err(e) = inserted {
            // No row, so no directory either (unless an older row still points at it).
            if old.is_none() {
                let _ = fs::remove_dir_all(&dir);
            }
            return Err(db_err(&dbp, e));
        }
        if let Some(b) = old {
            self.stats.entries -= 1;
            self.stats.bytes = self.stats.bytes.saturating_sub(b as u64);
        }
        self.stats.entries += 1;
        self.stats.bytes += bytes;
        self.index
            .entry(scope.to_string())
            .or_default()
            .insert(&id, embedding);
        self.evict_to_budget(Some(&id))?;
        Ok(Entry {
            id,
            owner,
            dir,
            description: text.to_string(),
            bytes,
            weights_sha256: files.weights_sha256.clone(),
            provenance: String::from_utf8_lossy(&files.provenance).into_owned(),
        })
    }

    /// Remove entries until the total is within the budget (never `keep`): each time the least
    /// recently used entry of the owner who holds the most bytes, so a caller alone may use the
    /// whole budget, and a caller who floods the cache evicts its own entries first.
    pub fn evict_to_budget(&mut self, keep: Option<&str>) -> Result<u64> {
        let dbp = self.db_path();
        let mut evicted = 0;
        while self.stats.bytes > self.max_bytes {
            let victim: Option<String> = self
                .db
                .query_row(
                    "SELECT id FROM adapters
                     WHERE id != ?1 AND owner = (
                       SELECT owner FROM adapters WHERE id != ?1
                       GROUP BY owner ORDER BY SUM(bytes) DESC, MIN(last_used) ASC LIMIT 1)
                     ORDER BY last_used ASC LIMIT 1",
                    params![keep.unwrap_or("")],
                    |r| r.get(0),
                )
                .optional()
                .db(&dbp)?;
            match victim {
                Some(id) => {
                    self.remove(&id)?;
                    evicted += 1;
                }
                None => break,
            }
        }
        Ok(evicted)
    }

    /// Every row, for the administrator: (id, owner, bytes, last used in ms since the epoch,
    /// hits), most recently used first. Descriptions are not listed.
    pub fn list(&self) -> Result<Vec<Listed>> {
        let dbp = self.db_path();
        let mut st = self
            .db
            .prepare(
                "SELECT id, owner, bytes, last_used, hits FROM adapters ORDER BY last_used DESC",
            )
            .db(&dbp)?;
        let it = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    u32::try_from(r.get::<_, i64>(1)?).unwrap_or(u32::MAX),
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)? as u64,
                ))
            })
            .db(&dbp)?;
        it.collect::<std::result::Result<_, _>>().db(&dbp)
    }

    /// Bytes recorded for row `id`, if the row exists.
    fn row_bytes(&self, id: &str) -> Result<Option<i64>> {
        let dbp = self.db_path();
        self.db
            .query_row(
                "SELECT bytes FROM adapters WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .db(&dbp)
    }

    /// Delete a row and its directory; true if it existed.
    pub fn remove(&mut self, id: &str) -> Result<bool> {
        if !is_valid_id(id) {
            return Ok(false);
        }
        let dbp = self.db_path();
        let old = self.row_bytes(id)?;
        let n = self
            .db
            .execute("DELETE FROM adapters WHERE id = ?1", params![id])
            .db(&dbp)?;
        if let Some(b) = old {
            self.stats.entries = self.stats.entries.saturating_sub(1);
            self.stats.bytes = self.stats.bytes.saturating_sub(b as u64);
        }
        // Scopes include the seed, so most hold one entry: drop a scope's index when it empties,
        // or the map grows by one empty index per seed ever served.
        let emptied = self
            .index
            .iter_mut()
            .find_map(|(scope, ix)| (ix.remove(id) && ix.is_empty()).then(|| scope.clone()));
        if let Some(scope) = emptied {
            self.index.remove(&scope);
        }
        let d = self.dir.join(id);
        if fs::symlink_metadata(&d)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            fs::remove_dir_all(&d).map_err(|e| Error::io("removing", &d, e))?;
        }
        Ok(n > 0)
    }

    /// Entry count and bytes (kept in memory; counted from the database at open).
    pub fn stats(&self) -> Result<Stats> {
        Ok(self.stats)
    }

    fn count(&self) -> Result<Stats> {
        let dbp = self.db_path();
        self.db
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM adapters",
                [],
                |r| {
                    Ok(Stats {
                        entries: r.get::<_, i64>(0)? as u64,
                        bytes: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
            .db(&dbp)
    }

    /// Hit counts per id (for tests and diagnostics).
    pub fn hits(&self) -> Result<HashMap<String, u64>> {
        let dbp = self.db_path();
        let mut st = self.db.prepare("SELECT id, hits FROM adapters").db(&dbp)?;
        let it = st
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .db(&dbp)?;
        it.collect::<std::result::Result<_, _>>().db(&dbp)
    }

    /// `PRAGMA integrity_check` result.
    pub fn integrity_check(&self) -> Result<String> {
        let dbp = self.db_path();
        self.db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .db(&dbp)
    }
}

/// The cache's id key, made from 32 random bytes the first time.
fn id_key(db: &Connection) -> rusqlite::Result<String> {
    db.execute(
        "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL)",
        [],
    )?;
    let have: Option<String> = db
        .query_row("SELECT v FROM meta WHERE k = 'id_key'", [], |r| r.get(0))
        .optional()?;
    if let Some(k) = have {
        return Ok(k);
    }
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut fs::File::open("/dev/urandom")
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
        &mut bytes,
    )
    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let key = sha256_hex(&bytes);
    db.execute(
        "INSERT OR IGNORE INTO meta(k, v) VALUES ('id_key', ?1)",
        params![key],
    )?;
    db.query_row("SELECT v FROM meta WHERE k = 'id_key'", [], |r| r.get(0))
}

/// Create `path` as an empty file of mode 0600 if it is missing (SQLite then creates the
/// database in it), and make an existing one 0600.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io("creating", path, e))?;
    private_file_if_exists(path)
}

fn private_file_if_exists(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::io(
            "opening",
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is a symbolic link; the cache database must be a regular file",
            ),
        )),
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io("making private", path, e))
        }
        _ => Ok(()),
    }
}

/// Adapter ids are 24 lowercase hex digits; anything else is refused before touching the disk.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == 24
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(tag: &str) -> AdapterFiles {
        AdapterFiles {
            weights: tag.repeat(100).into_bytes(),
            weights_sha256: sha256_hex(tag.repeat(100).as_bytes()),
            config: b"{}".to_vec(),
            provenance: b"{}".to_vec(),
        }
    }

    fn desc(text: &str) -> Description {
        Description::new(text).unwrap()
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn exact_similar_miss_persist_and_evict() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("cache.db");
        let dir = d.path().join("adapters");
        let mut c = Cache::open(&db, &dir, 10_000, 0.97).unwrap();
        let e1 = unit(&[1.0, 0.0, 0.0]);
        let a = c
            .insert(&desc("task a"), "s1", 1000, &e1, &files("a"))
            .unwrap();
        assert_eq!(
            c.lookup(&desc("task a"), "s1", None).unwrap().unwrap().1,
            Match::Exact
        );
        // near-duplicate embedding hits, a far one misses, another scope misses
        let near = unit(&[1.0, 0.1, 0.0]);
        assert_eq!(
            c.lookup(&desc("task a!"), "s1", Some(&near))
                .unwrap()
                .unwrap()
                .1,
            Match::Similar
        );
        assert!(c
            .lookup(&desc("task b"), "s1", Some(&unit(&[0.0, 1.0, 0.0])))
            .unwrap()
            .is_none());
        assert!(c
            .lookup(&desc("task a"), "s2", Some(&e1))
            .unwrap()
            .is_none());
        drop(c);
        // persistence
        let mut c = Cache::open(&db, &dir, 10_000, 0.97).unwrap();
        assert_eq!(
            c.lookup(&desc("task a"), "s1", None).unwrap().unwrap().0.id,
            a.id
        );
        // corruption is detected and the row dropped
        fs::write(a.dir.join(WEIGHTS_FILE), b"garbage").unwrap();
        assert!(c
            .lookup(&desc("task a"), "s1", Some(&e1))
            .unwrap()
            .is_none());
        assert_eq!(c.stats().unwrap().entries, 0);
        // eviction keeps the total within budget, least recently used first
        let mut c = Cache::open(&db, &dir, 2 * 104 + 10, 0.97).unwrap();
        let x = c
            .insert(&desc("x"), "s", 1000, &unit(&[1.0, 0.0, 0.0]), &files("x"))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let y = c
            .insert(&desc("y"), "s", 1000, &unit(&[0.0, 1.0, 0.0]), &files("y"))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        c.lookup(&desc("x"), "s", None).unwrap().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        c.insert(&desc("z"), "s", 1000, &unit(&[0.0, 0.0, 1.0]), &files("z"))
            .unwrap();
        let s = c.stats().unwrap();
        assert!(s.bytes <= 2 * 104 + 10, "{s:?}");
        assert!(c.get(&x.id).unwrap().is_some(), "recently used x stays");
        assert!(
            c.get(&y.id).unwrap().is_none(),
            "least recently used y goes"
        );
        assert!(!y.dir.exists());
        assert_eq!(c.integrity_check().unwrap(), "ok");
    }

    /// Past the budget, the owner holding the most bytes loses its least recently used entry:
    /// a flood of one owner's misses evicts that owner's entries, not another's.
    #[test]
    fn a_flooding_owner_evicts_its_own_entries() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Cache::open(
            &d.path().join("c.db"),
            &d.path().join("a"),
            4 * 104 + 10,
            0.97,
        )
        .unwrap();
        let quiet = c
            .insert(&desc("quiet"), "s", 2000, &[1.0], &files("q"))
            .unwrap();
        for i in 0..20 {
            let tag = format!("f{i:02}");
            c.insert(&desc(&tag), "s", 1000, &[1.0], &files(&tag[..1]))
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(c.stats().unwrap().bytes <= 4 * 104 + 10);
        assert!(
            c.get(&quiet.id).unwrap().is_some(),
            "the quiet owner's adapter was evicted by another owner's flood"
        );
        let owners: Vec<u32> = c.list().unwrap().iter().map(|r| r.1).collect();
        assert_eq!(
            owners.iter().filter(|o| **o == 1000).count(),
            3,
            "{owners:?}"
        );
        // Alone, an owner may fill the whole budget.
        c.remove(&quiet.id).unwrap();
        c.insert(&desc("f-last"), "s", 1000, &[1.0], &files("l"))
            .unwrap();
        assert_eq!(c.stats().unwrap().entries, 4);
    }

    #[test]
    fn reconcile_drops_orphans_both_ways() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("cache.db");
        let dir = d.path().join("adapters");
        let mut c = Cache::open(&db, &dir, 1 << 20, 0.97).unwrap();
        let a = c
            .insert(&desc("a"), "s", 1000, &[1.0], &files("a"))
            .unwrap();
        let b = c
            .insert(&desc("b"), "s", 1000, &[1.0], &files("b"))
            .unwrap();
        drop(c);
        fs::remove_dir_all(&a.dir).unwrap();
        fs::create_dir(dir.join("stray")).unwrap();
        fs::create_dir(dir.join(".x.tmp-1-2")).unwrap();
        let mut c = Cache::open(&db, &dir, 1 << 20, 0.97).unwrap();
        assert_eq!(c.stats().unwrap().entries, 1);
        assert!(c.get(&b.id).unwrap().is_some());
        assert!(!dir.join("stray").exists() && !dir.join(".x.tmp-1-2").exists());
    }

    #[test]
    fn ids_are_validated() {
        assert!(is_valid_id("0123456789abcdef01234567"));
        assert!(!is_valid_id("../../etc/passwd"));
        assert!(!is_valid_id("0123456789ABCDEF01234567"));
    }
}
