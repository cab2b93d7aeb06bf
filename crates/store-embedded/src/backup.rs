//! Backups of a bounded store while it runs. The engine's files change under compaction, so
//! they are never copied as files: the process that holds the engine open copies it with a
//! consistent read ([`Engine::copy_to`]) and then the journal from the engine's position on,
//! with no checkpoint in between. A running server does this when `farthing backup` asks it
//! over the control socket in the data directory; with no server running, `farthing backup`
//! opens the store and does it itself.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use farthing_store::StoreError;

use crate::{BackupCopied, ENGINE_DIR, Engine, segments};

/// The control socket's name inside the data directory: a running server answers backup
/// requests on it.
pub const CONTROL_SOCKET: &str = "farthing.sock";

/// Copies the store in `data_dir`, whose engine this process holds open, to `to`: the engine at
/// one position, then every journal record from there on that is whole when it is read.
pub fn backup_open(
    engine: &Engine,
    data_dir: &Path,
    to: &Path,
) -> Result<BackupCopied, StoreError> {
    crate::refuse_a_target_with_a_journal(to)?;
    if to.join(ENGINE_DIR).exists() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already holds an engine", to.display()),
        )));
    }
    let (position, copied) =
        engine.copy_to(&to.join(ENGINE_DIR), |_| segments::backup(data_dir, to))?;
    if copied.first_position > position {
        return Err(StoreError::Corrupt {
            offset: 0,
            reason: format!(
                "the journal starts at position {}, after the engine's position {position}",
                copied.first_position
            ),
        });
    }
    Ok(copied)
}

/// Asks the server running on `data_dir` to back it up to `to`. `None` when no server
/// answers on the data directory's control socket.
pub fn ask_running_server(data_dir: &Path, to: &Path) -> Result<Option<BackupCopied>, StoreError> {
    let mut stream = match UnixStream::connect(data_dir.join(CONTROL_SOCKET)) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(error) => return Err(error.into()),
    };
    let to = std::path::absolute(to)?;
    let to = to.to_str().ok_or_else(|| {
        StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the backup's path is not UTF-8",
        ))
    })?;
    stream.write_all(format!("backup\t{to}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    parse_answer(answer.trim_end()).map(Some)
}

/// The server's side: answers one request line.
pub fn answer_request(engine: &Engine, data_dir: &Path, request: &str) -> String {
    let Some(to) = request.trim_end().strip_prefix("backup\t") else {
        return "error\tunknown request\n".to_string();
    };
    match backup_open(engine, data_dir, Path::new(to)) {
        Ok(copied) => format!(
            "ok\t{}\t{}\t{}\n",
            copied.first_position, copied.records, copied.bytes
        ),
        Err(error) => format!("error\t{}\n", error.to_string().replace(['\t', '\n'], " ")),
    }
}

fn parse_answer(answer: &str) -> Result<BackupCopied, StoreError> {
    let fields: Vec<&str> = answer.split('\t').collect();
    match fields.as_slice() {
        ["ok", first, records, bytes] => {
            let number = |text: &str| {
                text.parse::<u64>().map_err(|_| {
                    StoreError::Io(std::io::Error::other(format!(
                        "the server's answer {answer:?} does not read"
                    )))
                })
            };
            Ok(BackupCopied {
                first_position: number(first)?,
                records: number(records)?,
                bytes: number(bytes)?,
            })
        }
        ["error", message] => Err(StoreError::Io(std::io::Error::other(format!(
            "the running server could not back up: {message}"
        )))),
        _ => Err(StoreError::Io(std::io::Error::other(format!(
            "the server's answer {answer:?} does not read"
        )))),
    }
}
