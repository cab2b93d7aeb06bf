//! The test clock's offset on the embedded store: one small file in the data directory,
//! replaced atomically (written beside, made durable, renamed, the directory made durable).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use farthing_store::{StoreError, StoreFuture, TestClockStore};

/// The file that holds the offset, in decimal microseconds.
const TEST_CLOCK_FILE: &str = "test-clock";

/// The test clock's offset, kept in `test-clock` in the data directory.
pub struct FileTestClock {
    dir: PathBuf,
    /// The offset as last written; writes are serialized under this lock.
    offset: Mutex<u64>,
}

impl FileTestClock {
    /// Reads the offset kept in `dir` (0 when there is none yet).
    pub fn open(dir: &Path) -> Result<FileTestClock, StoreError> {
        let offset = match fs::read_to_string(dir.join(TEST_CLOCK_FILE)) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| {
                StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{TEST_CLOCK_FILE} does not hold a number of microseconds"),
                ))
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(error) => return Err(error.into()),
        };
        Ok(FileTestClock {
            dir: dir.to_path_buf(),
            offset: Mutex::new(offset),
        })
    }

    fn write(&self, offset: u64) -> Result<(), StoreError> {
        let temporary = self.dir.join(format!("{TEST_CLOCK_FILE}.new"));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)?;
        writeln!(file, "{offset}")?;
        file.sync_all()?;
        fs::rename(&temporary, self.dir.join(TEST_CLOCK_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

impl TestClockStore for FileTestClock {
    fn test_clock_offset(&self) -> StoreFuture<'_, u64> {
        let offset = *self.offset.lock().expect("test clock lock");
        Box::pin(async move { Ok(offset) })
    }

    fn advance_test_clock(&self, by_micros: u64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let mut offset = self.offset.lock().expect("test clock lock");
            let advanced = offset.saturating_add(by_micros);
            self.write(advanced)?;
            *offset = advanced;
            Ok(advanced)
        })
    }
}
