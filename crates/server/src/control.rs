//! The control socket in the embedded store's data directory: `farthing backup` asks the
//! running server for a consistent copy here, since only the process holding the engine open
//! can read it whole while it changes. The socket is the owner's alone (mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use farthing_store_embedded::Engine;
use farthing_store_embedded::backup::{CONTROL_SOCKET, answer_request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Listens on the data directory's control socket until the returned guard is dropped. The
/// data directory's lock is held, so a socket file left there is a dead server's.
pub(crate) fn listen(data_dir: &Path, engine: Arc<Engine>) -> std::io::Result<SocketGuard> {
    let path = data_dir.join(CONTROL_SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let data_dir = data_dir.to_path_buf();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (engine, data_dir) = (engine.clone(), data_dir.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_err() {
                    return;
                }
                tracing::info!(request = %line.trim_end(), "control request");
                let answer =
                    tokio::task::spawn_blocking(move || answer_request(&engine, &data_dir, &line))
                        .await
                        .unwrap_or_else(|_| "error\tthe backup stopped\n".to_string());
                let _ = write.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(SocketGuard { path, task })
}

/// Stops listening and removes the socket file when dropped.
pub(crate) struct SocketGuard {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}
