//! `farthing bench --only soak`: a long run of the embedded store as the server runs it, to
//! show that memory, throughput, latency and restart time do not grow with history.
//!
//! Payers (funded) and merchants are made first; then batches of 8,190 payments among them go
//! in one after another, while one client sends single payments one at a time beside them.
//! Each tenth of the run reports its payments per second, the process's resident memory at
//! its end and the highest it was during the tenth (looked at every 50 ms), and the single
//! payments' p99 and longest wait. At the end: the process's processor time per payment, and
//! each kind of thread's with its time waiting for a processor; bytes on disk per payment; and the time a
//! restart takes to be ready.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use farthing_ledger::{Amount, Currency, TransferId};
use farthing_payments::{
    BatchItemOutcome, Command, FeeSchedule, FundingSource, KeyHash, MerchantId, Outcome,
    PayCommand, PayerId, PaymentId, Record, TopupId,
};
use farthing_service::Service;
use serde_json::{Value, json};

use crate::bench::{bounded_service, set_up, stop};

const MERCHANTS: usize = 1_000;
const BATCH: usize = 8_190;
/// Payers made per round of set-up.
const SETUP_CHUNK: usize = 50_000;

/// A small, fast generator of choices (not of ids).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

fn usd() -> Currency {
    Currency::parse("USD").expect("a known code")
}

/// A payment between random parties, with ids from the service's own time-ordered
/// generator, as a server makes them.
fn payment(
    service: &Service,
    rng: &mut Rng,
    payers: &[PayerId],
    merchants: &[MerchantId],
) -> PayCommand {
    PayCommand {
        id: PaymentId::from_u128(service.next_id()),
        payer: payers[rng.below(payers.len())],
        merchant: merchants[rng.below(merchants.len())],
        amount: Amount::from_micros(1 + rng.below(1_000) as u64),
        currency: usd(),
        description: None,
        reference: None,
        transfer_ids: [TransferId(service.next_id()), TransferId(service.next_id())],
    }
}

/// Resident memory of this process, in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Bytes of every file under `dir`.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_bytes(&entry.path()),
            // Blocks allocated, not the length: fjall's journal file is sparse.
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                meta.blocks() * 512
            }
            Err(_) => 0,
        })
        .sum()
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Processor time of each thread of this process alive when read, by thread id: its name,
/// nanoseconds on a processor, and nanoseconds runnable but waiting for one
/// (`/proc/self/task/*/schedstat`). Empty where the kernel does not keep them.
type ThreadTimes = std::collections::BTreeMap<u32, (String, u64, u64)>;

fn thread_times() -> ThreadTimes {
    let mut times = ThreadTimes::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return times;
    };
    for task in tasks.filter_map(Result::ok) {
        let Some(tid) = task.file_name().to_str().and_then(|tid| tid.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        if let Some((on_cpu, queued)) = parse_schedstat(&stat) {
            times.insert(tid, (name.trim().to_string(), on_cpu, queued));
        }
    }
    times
}

/// A `schedstat` line: nanoseconds on a processor, nanoseconds waiting for one, time slices.
fn parse_schedstat(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace().map(str::parse::<u64>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

/// Processor time of the whole process so far, every thread counted, those ended too, in
/// nanoseconds (`/proc/self/stat`; 0 where there is none).
fn process_cpu_nanos() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| parse_stat_cpu_nanos(&stat))
        .unwrap_or(0)
}

/// User and system time from a `/proc/PID/stat` line, in nanoseconds. The name in it (in
/// parentheses) may hold spaces and parentheses, so fields are counted from the last `)`;
/// times are in the kernel's fixed 100 ticks a second.
fn parse_stat_cpu_nanos(line: &str) -> Option<u64> {
    const NANOS_PER_TICK: u64 = 10_000_000;
    let mut fields = line
        .get(line.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) * NANOS_PER_TICK)
}

/// What each kind of thread (by name) spent between two readings, in nanoseconds on a
/// processor and waiting for one, busiest first. A thread begun between them counts from 0;
/// one ended between them is missing.
fn thread_time_spent(before: &ThreadTimes, after: &ThreadTimes) -> Vec<(String, u64, u64)> {
    let mut by_name: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    for (tid, (name, on_cpu, queued)) in after {
        let (was_on, was_queued) = before
            .get(tid)
            .filter(|(was_name, _, _)| was_name == name)
            .map_or((0, 0), |(_, on, queued)| (*on, *queued));
        let spent = by_name.entry(name).or_default();
        spent.0 += on_cpu.saturating_sub(was_on);
        spent.1 += queued.saturating_sub(was_queued);
    }
    let mut spent: Vec<(String, u64, u64)> = by_name
        .into_iter()
        .map(|(name, (on_cpu, queued))| (name.to_string(), on_cpu, queued))
        .collect();
    spent.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    spent
}

/// Makes `payers` funded payers and the merchants, in rounds, and returns their ids.
async fn make_parties(
    service: &Service,
    payers: usize,
) -> anyhow::Result<(Vec<PayerId>, Vec<MerchantId>)> {
    let mut payer_ids = Vec::with_capacity(payers);
    let mut merchant_ids = Vec::with_capacity(MERCHANTS);
    let record = |command| Record {
        now: farthing_ledger::Timestamp(0),
        idempotency: None,
        command,
    };
    let mut made = 0;
    while made < payers {
        let n = SETUP_CHUNK.min(payers - made);
        let mut records = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let id = PayerId::from_u128(service.next_id());
            let mut key = [0u8; 32];
            key[..16].copy_from_slice(&id.to_u128().to_le_bytes());
            records.push(record(Command::CreatePayer {
                id,
                name: format!("payer {made}"),
                key_hash: KeyHash(key),
            }));
            records.push(record(Command::Topup {
                id: TopupId::from_u128(service.next_id()),
                payer: id,
                amount: Amount::from_micros(1_000_000_000_000),
                currency: usd(),
                source: FundingSource::Sandbox,
                transfer_id: TransferId(service.next_id()),
            }));
            payer_ids.push(id);
            made += 1;
        }
        set_up(service, &records).await?;
    }
    let mut records = Vec::new();
    for n in 0..MERCHANTS {
        let id = MerchantId::from_u128(service.next_id());
        let mut key = [1u8; 32];
        key[..16].copy_from_slice(&id.to_u128().to_le_bytes());
        records.push(record(Command::CreateMerchant {
            id,
            name: format!("merchant {n}"),
            key_hash: KeyHash(key),
            fee: FeeSchedule {
                bps: 100,
                fixed: Amount::ZERO,
            },
        }));
        merchant_ids.push(id);
    }
    set_up(service, &records).await?;
    Ok((payer_ids, merchant_ids))
}

/// The longest a single payment beside the batches should wait, at any moment.
const LONG_WAIT_MICROS: u32 = 250_000;
/// How often the soak looks at resident memory for each tenth's highest.
const RESIDENT_SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Latencies of the single payments, in microseconds, by tenth of the run.
type Latencies = Arc<Mutex<Vec<Vec<u32>>>>;

pub(crate) async fn soak(
    root: &std::path::Path,
    total: u64,
    payers: usize,
    memory: farthing_server::Memory,
    say: impl Fn(&str),
) -> anyhow::Result<Value> {
    let dir = root.join("soak");
    let _ = std::fs::remove_dir_all(&dir);
    let (service, _, _) = bounded_service(&dir, memory).await?;
    let started = Instant::now();
    let (payer_ids, merchant_ids) = make_parties(&service, payers).await?;
    say(&format!(
        "soak: {payers} funded payers and {MERCHANTS} merchants made in {:.0} s; resident {} MiB",
        started.elapsed().as_secs_f64(),
        resident_bytes() >> 20
    ));
    let (payer_ids, merchant_ids) = (Arc::new(payer_ids), Arc::new(merchant_ids));

    // One client beside the batches, one single payment at a time.
    let tenths = 10usize;
    let window = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let latencies: Latencies = Arc::new(Mutex::new(vec![Vec::new(); tenths]));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let single = {
        let (service, payers, merchants) =
            (service.clone(), payer_ids.clone(), merchant_ids.clone());
        let (window, latencies, running) = (window.clone(), latencies.clone(), running.clone());
        tokio::spawn(async move {
            let mut rng = Rng(0x5EED_0001);
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let pay = payment(&service, &mut rng, &payers, &merchants);
                let sent = Instant::now();
                let executed = service.submit(Command::Pay(pay), None).await?;
                let waited = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                if !matches!(executed.outcome, Outcome::Paid(_)) {
                    bail!("a single payment was refused: {:?}", executed.outcome);
                }
                if waited >= LONG_WAIT_MICROS {
                    tracing::info!(
                        millis = waited / 1000,
                        "soak: a single payment waited past the target"
                    );
                }
                let at = window.load(std::sync::atomic::Ordering::Relaxed);
                latencies.lock().expect("latencies")[at].push(waited);
                // About 1,000 a second: a steady stream, not a second load.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            anyhow::Ok(())
        })
    };

    // Resident memory rises while a checkpoint is written and falls after: a look at the end
    // of a tenth finds it wherever the cycle stands, so each tenth's highest is kept too.
    let peaks: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
        (0..tenths)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
    );
    let sampler = {
        let (window, peaks, running) = (window.clone(), peaks.clone(), running.clone());
        std::thread::spawn(move || {
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let at = window.load(std::sync::atomic::Ordering::Relaxed);
                peaks[at].fetch_max(resident_bytes(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(RESIDENT_SAMPLE_EVERY);
            }
        })
    };

    let batches = (total / BATCH as u64).max(tenths as u64);
    let batches_started = Instant::now();
    let threads_before = thread_times();
    let process_before = process_cpu_nanos();
    let per_tenth = batches / tenths as u64;
    let mut rng = Rng(0x5EED_0002);
    let mut rows = Vec::new();
    let mut made = 0u64;
    for tenth in 0..tenths {
        window.store(tenth, std::sync::atomic::Ordering::Relaxed);
        let begun = Instant::now();
        for _ in 0..per_tenth {
            let items: Vec<PayCommand> = (0..BATCH)
                .map(|_| payment(&service, &mut rng, &payer_ids, &merchant_ids))
                .collect();
            let executed = service.submit(Command::PayBatch(items), None).await?;
            match &executed.outcome {
                Outcome::PaidBatch(items)
                    if items
                        .iter()
                        .all(|item| matches!(item, BatchItemOutcome::Succeeded(_))) => {}
                other => bail!("a batch was refused: {other:?}"),
            }
            made += BATCH as u64;
        }
        let secs = begun.elapsed().as_secs_f64();
        let rate = (per_tenth * BATCH as u64) as f64 / secs;
        let mut waits = latencies.lock().expect("latencies")[tenth].clone();
        waits.sort_unstable();
        let (p99, max) = (percentile(&waits, 0.99), waits.last().copied().unwrap_or(0));
        let resident = resident_bytes();
        let highest = peaks[tenth]
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(resident);
        let (heap_in_use, heap_free) = crate::alloc::heap_figures().unwrap_or((0, 0));
        say(&format!(
            "soak: {made} payments; this tenth {rate:.0} payments/s; resident {} MiB, highest {} MiB (heap in use {} MiB, freed and kept {} MiB); single payments p99 {:.1} ms, longest {:.1} ms ({} sent)",
            resident >> 20,
            highest >> 20,
            heap_in_use >> 20,
            heap_free >> 20,
            f64::from(p99) / 1000.0,
            f64::from(max) / 1000.0,
            waits.len()
        ));
        rows.push(json!({
            "payments": made,
            "payments_per_sec": rate.round(),
            "resident_bytes": resident,
            "resident_bytes_highest": highest,
            "heap_in_use_bytes": heap_in_use,
            "heap_freed_kept_bytes": heap_free,
            "single_p99_micros": p99,
            "single_max_micros": max,
            "single_sent": waits.len(),
        }));
    }
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    single.await??;
    sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the memory sampler panicked"))?;
    let overall = made as f64 / batches_started.elapsed().as_secs_f64();
    let threads = thread_time_spent(&threads_before, &thread_times());
    let process_cpu = process_cpu_nanos().saturating_sub(process_before);
    let per_payment = |nanos: u64| nanos as f64 / made.max(1) as f64;
    say(&format!(
        "soak: processor time per payment, {:.0} ns in all threads (those ended too); by thread alive at the end (ns on a processor / waiting for one): {}",
        per_payment(process_cpu),
        threads
            .iter()
            .filter(|(_, on_cpu, _)| *on_cpu > 0)
            .map(|(name, on_cpu, queued)| format!(
                "{name} {:.0} / {:.0}",
                per_payment(*on_cpu),
                per_payment(*queued)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let threads: Vec<Value> = threads
        .iter()
        .map(|(name, on_cpu, queued)| {
            json!({
                "name": name,
                "on_cpu_secs": *on_cpu as f64 / 1e9,
                "waiting_for_cpu_secs": *queued as f64 / 1e9,
                "on_cpu_nanos_per_payment": per_payment(*on_cpu).round(),
            })
        })
        .collect();
    stop(service).await?;
    let disk = disk_bytes(&dir);
    say(&format!(
        "soak: {made} batch payments at {overall:.0}/s overall; {} MiB on disk, {} bytes per payment",
        disk >> 20,
        disk / made.max(1)
    ));

    // A restart on the data directory: ready once open.
    let began = Instant::now();
    let (service, replayed, _) = bounded_service(&dir, memory).await?;
    let restart_secs = began.elapsed().as_secs_f64();
    let resident_after_restart = resident_bytes();
    stop(service).await?;
    say(&format!(
        "soak: restart ready in {restart_secs:.2} s ({replayed} journal records replayed)"
    ));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "payers": payers,
        "merchants": MERCHANTS,
        "batch_payments": made,
        "tenths": rows,
        "payments_per_sec_overall": overall.round(),
        "threads": threads,
        "process_on_cpu_nanos_per_payment": per_payment(process_cpu).round(),
        "disk_bytes": disk,
        "disk_bytes_per_payment": disk / made.max(1),
        "restart_secs": restart_secs,
        "restart_records_replayed": replayed,
        "resident_bytes_after_restart": resident_after_restart,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedstat_line_gives_time_on_a_processor_and_time_waiting_for_one() {
        assert_eq!(
            parse_schedstat("14520000000 3290000000 9160\n"),
            Some((14_520_000_000, 3_290_000_000))
        );
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("12 x 3"), None);
    }

    #[test]
    fn a_stat_line_gives_user_and_system_time_counted_after_the_name() {
        // A name with a space and a parenthesis of its own; utime 1234, stime 66 ticks.
        let line =
            "4242 (farthing (x) y) R 1 4242 4242 0 -1 4194304 100 0 0 0 1234 66 0 0 20 0 9 0 5 6 7";
        assert_eq!(parse_stat_cpu_nanos(line), Some(1_300 * 10_000_000));
        assert_eq!(parse_stat_cpu_nanos("4242 (farthing) R 1"), None);
        assert_eq!(parse_stat_cpu_nanos("no name here"), None);
    }

    #[test]
    fn time_spent_is_summed_by_thread_name_from_the_first_reading_on() {
        let reading = |threads: &[(u32, &str, u64, u64)]| -> ThreadTimes {
            threads
                .iter()
                .map(|&(tid, name, on, queued)| (tid, (name.to_string(), on, queued)))
                .collect()
        };
        let before = reading(&[
            (1, "writer", 100, 10),
            (2, "worker", 50, 5),
            (3, "gone", 9, 9),
        ]);
        let after = reading(&[
            (1, "writer", 400, 30),
            (2, "worker", 80, 5),
            // Begun between the readings: all of it counts.
            (4, "worker", 20, 1),
            // A reused id under another name is another thread.
            (3, "new", 7, 2),
        ]);
        assert_eq!(
            thread_time_spent(&before, &after),
            vec![
                ("writer".to_string(), 300, 20),
                ("worker".to_string(), 50, 1),
                ("new".to_string(), 7, 2),
            ]
        );
        assert!(
            thread_time_spent(&after, &after)
                .iter()
                .all(|(_, on, queued)| *on == 0 && *queued == 0)
        );
    }
}
