//! The journal's binary form stays readable: records written by earlier versions decode to
//! what they meant then.

use farthing_ledger::{
    Account, AccountId, AccountKind, Amount, Currency, HoldState, Timestamp, Transfer, TransferId,
    TransferKind, TransferRecord, TransferRejection,
};
use farthing_payments::codec;
use farthing_payments::*;

/// An import carrying one item of every kind, with odd values (ids beyond `i64`, empty and
/// non-ASCII texts, a failed transfer, a live-looking hold).
fn import_of_every_kind() -> Record {
    let usd = Currency::parse("USD").unwrap();
    let merchant = MerchantId::from_u128(u128::MAX - 1);
    let payer = PayerId::from_u128(3);
    let payment = PaymentId::from_u128(1 << 100);
    let items = vec![
        Imported::OperatorKey(KeyHash([1; 32])),
        Imported::Merchant {
            merchant: Merchant {
                id: merchant,
                name: "Café Ünïcode".into(),
                fee: FeeSchedule {
                    bps: 250,
                    fixed: Amount::from_micros(u64::MAX),
                },
                created_at: Timestamp(10),
            },
            key_hash: KeyHash([2; 32]),
        },
        Imported::Payer {
            payer: Payer {
                id: payer,
                name: String::new(),
                created_at: Timestamp(11),
            },
            key_hash: KeyHash([3; 32]),
        },
        Imported::Account {
            owner: Owner::Payer(payer),
            account: Account {
                id: AccountId(u64::MAX),
                kind: AccountKind::PayerWallet,
                currency: usd,
                debits_posted: 1,
                credits_posted: 2,
                debits_pending: 3,
                credits_pending: 4,
            },
        },
        Imported::Account {
            owner: Owner::PlatformFees,
            account: Account {
                id: AccountId(5),
                kind: AccountKind::PlatformFees,
                currency: usd,
                debits_posted: 0,
                credits_posted: 9,
                debits_pending: 0,
                credits_pending: 0,
            },
        },
        Imported::Transfer(TransferRecord {
            transfer: Transfer {
                id: TransferId(u128::MAX),
                debit: AccountId(u64::MAX),
                credit: AccountId(5),
                amount: Amount::from_micros(u64::MAX),
                kind: TransferKind::Pending { timeout_secs: 60 },
                linked: true,
            },
            timestamp: Timestamp(12),
            outcome: Err(TransferRejection::ExceedsAvailableBalance),
            hold: None,
            expires_at: None,
        }),
        Imported::Transfer(TransferRecord {
            transfer: Transfer {
                id: TransferId(7),
                debit: AccountId(1),
                credit: AccountId(2),
                amount: Amount::from_micros(5),
                kind: TransferKind::PostPending {
                    pending_id: TransferId(6),
                },
                linked: false,
            },
            timestamp: Timestamp(13),
            outcome: Ok(()),
            hold: Some(HoldState::Posted),
            expires_at: Some(Timestamp(99)),
        }),
        Imported::Payment(Payment {
            id: payment,
            payer,
            merchant,
            amount: Amount::from_micros(1_000),
            currency: usd,
            fee: Amount::from_micros(30),
            description: Some("an article".into()),
            reference: None,
            created_at: Timestamp(14),
            amount_refunded: Amount::from_micros(100),
            fee_refunded: Amount::from_micros(3),
            hold: None,
        }),
        Imported::Topup(Topup {
            id: TopupId::from_u128(8),
            payer,
            amount: Amount::from_micros(5_000),
            currency: usd,
            source: FundingSource::SandboxDecline,
            created_at: Timestamp(15),
        }),
        Imported::Refund(Refund {
            id: RefundId::from_u128(9),
            payment,
            payer,
            merchant,
            amount: Amount::from_micros(100),
            currency: usd,
            fee_refunded: Amount::from_micros(3),
            created_at: Timestamp(16),
        }),
        Imported::Entry {
            payer,
            entry: Entry {
                object: EntryObject::Refund(RefundId::from_u128(9)),
                currency: usd,
                credit: true,
                amount: Amount::from_micros(100),
                balance_after: Amount::from_micros(4_100),
                created_at: Timestamp(16),
            },
        },
        Imported::Idempotency(IdempotencyRow {
            key: IdempotencyKey {
                principal: Principal::Merchant(merchant),
                key: "key-1".into(),
            },
            fingerprint: [7; 32],
            outcome: Outcome::Rejected(Rejection::InsufficientFunds),
            made: Timestamp(17),
        }),
    ];
    Record {
        now: Timestamp(18),
        idempotency: None,
        command: Command::Import(items),
    }
}

/// `import_of_every_kind` as version 1 of the journal wrote it.
const FIRST_FORMAT: &[&str] = &[
    "01120000000000000000090c0000000101010101010101010101010101010101010101010101010101010101",
    "0101010102feffffffffffffffffffffffffffffff0f000000436166c3a920c39c6ec3af636f646502020202",
    "02020202020202020202020202020202020202020202020202020202fa000000ffffffffffffffff0a000000",
    "0000000003030000000000000000000000000000000000000003030303030303030303030303030303030303",
    "030303030303030303030303030b00000000000000040103000000000000000000000000000000ffffffffff",
    "ffffff0155534400010000000000000002000000000000000300000000000000040000000000000004030500",
    "0000000000000355534400000000000000000009000000000000000000000000000000000000000000000005",
    "ffffffffffffffffffffffffffffffffffffffffffffffff0500000000000000ffffffffffffffff023c0000",
    "00010c0000000000000011000005070000000000000000000000000000000100000000000000020000000000",
    "000005000000000000000306000000000000000000000000000000000d000000000000000002016300000000",
    "000000060000000000000000000000001000000003000000000000000000000000000000feffffffffffffff",
    "ffffffffffffffffe803000000000000555344001e00000000000000010a000000616e2061727469636c6500",
    "0e00000000000000640000000000000003000000000000000708000000000000000000000000000000030000",
    "00000000000000000000000000881300000000000055534400020f0000000000000008090000000000000000",
    "000000000000000000000000000000000000001000000003000000000000000000000000000000feffffffff",
    "ffffffffffffffffffffff640000000000000055534400030000000000000010000000000000000903000000",
    "0000000000000000000000000309000000000000000000000000000000555344000164000000000000000410",
    "00000000000010000000000000000a02feffffffffffffffffffffffffffffff050000006b65792d31070707",
    "0707070707070707070707070707070707070707070707070707070707110000000000000003000000010904",
];

/// The same record as the current version writes it: each item in its stored form.
const CURRENT_FORMAT: &[&str] = &[
    "02120000000000000000090c0000000101010101010101010101010101010101010101010101010101010101",
    "0101010102feffffffffffffffffffffffffffffff0f000000436166c3a920c39c6ec3af636f646502020202",
    "02020202020202020202020202020202020202020202020202020202fa000000ffffffffffffffff0a000000",
    "0000000003030000000000000000000000000000000000000003030303030303030303030303030303030303",
    "030303030303030303030303030b00000000000000040103000000000000000000000000000000ffffffffff",
    "ffffff0155534400010000000000000002000000000000000300000000000000040000000000000004030000",
    "0000000000000000000000000000050000000000000003555344000000000000000000090000000000000000",
    "00000000000000000000000000000005ffffffffffffffffffffffffffffffffffffffffffffffff05000000",
    "00000000ffffffffffffffff0200013c000000011100000c0000000000000005070000000000000000000000",
    "0000000001000000000000000200000000000000050000000000000003010600000000000000000000000000",
    "0000000000020163000000000000000d00000000000000060000000000000000000000001000000003000000",
    "000000000000000000000000feffffffffffffffffffffffffffffffe803000000000000555344001e000000",
    "00000000010a000000616e2061727469636c65000e0000000000000064000000000000000300000000000000",
    "0708000000000000000000000000000000030000000000000000000000000000008813000000000000555344",
    "00020f0000000000000008090000000000000000000000000000000000000000000000000000001000000003",
    "000000000000000000000000000000feffffffffffffffffffffffffffffff64000000000000005553440003",
    "0000000000000010000000000000000903000000000000000000000000000000030900000000000000000000",
    "000000000055534400016400000000000000041000000000000010000000000000000a02feffffffffffffff",
    "ffffffffffffffff050000006b65792d31070707070707070707070707070707070707070707070707070707",
    "0707070707030000000109041100000000000000",
];

fn bytes_of(hex: &[&str]) -> Vec<u8> {
    let hex: String = hex.concat();
    (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn an_import_written_by_the_first_version_still_reads_as_it_was_meant() {
    assert_eq!(
        codec::decode(&bytes_of(FIRST_FORMAT)),
        Ok(import_of_every_kind())
    );
}

#[test]
fn the_current_version_writes_an_import_exactly_as_it_did_when_it_shipped() {
    let mut bytes = Vec::new();
    codec::encode(&import_of_every_kind(), &mut bytes);
    assert_eq!(bytes, bytes_of(CURRENT_FORMAT));
    assert_eq!(codec::decode(&bytes), Ok(import_of_every_kind()));
}

/// Each kind's columns as its reader asks for them equal those its writer puts, so a
/// relational store selects exactly what it reads.
#[test]
fn every_stored_kind_reads_the_columns_it_writes() {
    use farthing_kernel::Columns;
    fn same<T: farthing_kernel::Fields>(record: &T) {
        assert_eq!(Columns::list::<T>(), Columns::of(record));
    }
    let Command::Import(mut items) = import_of_every_kind().command else {
        unreachable!("an import")
    };
    let Command::Import(holds) = import_of_holds().command else {
        unreachable!("an import")
    };
    items.extend(holds);
    for item in items {
        match item {
            Imported::OperatorKey(_) => {}
            Imported::Merchant { merchant, key_hash } => same(&MerchantRow { merchant, key_hash }),
            Imported::Payer { payer, key_hash } => same(&PayerRow { payer, key_hash }),
            Imported::Account { owner, account } => same(&AccountRow { owner, account }),
            Imported::Transfer(record) => same(&record),
            Imported::Payment(payment) => same(&payment),
            Imported::Topup(topup) => same(&topup),
            Imported::Refund(refund) => same(&refund),
            Imported::Entry { payer, entry } => same(&EntryRow { payer, entry }),
            Imported::Idempotency(row) => same(&row),
            Imported::Row(row) => {
                let hold = row.decode::<HoldKind>().expect("a hold").expect("decodes");
                same(&hold)
            }
        }
    }
}

#[test]
fn a_version_the_build_does_not_know_is_refused() {
    let mut bytes = bytes_of(CURRENT_FORMAT);
    bytes[0] = 3;
    assert_eq!(
        codec::decode(&bytes),
        Err(codec::DecodeError::UnknownVersion(3))
    );
}

// =============================================================================================
// Holds: the commands that place, settle and expire them, and a hold as an import carries it
// =============================================================================================

/// An import of a held payment's hold and a captured one's, with odd values.
fn import_of_holds() -> Record {
    let hold = Hold {
        status: HoldStatus::Held,
        amount_authorized: Amount::from_micros(u64::MAX),
        amount_captured: Amount::ZERO,
        fee_captured: Amount::ZERO,
        expires_at: Timestamp(u64::MAX),
        resolved_at: None,
        transfers: [TransferId(u128::MAX), TransferId(1), TransferId(1 << 64)],
    };
    Record {
        now: Timestamp(19),
        idempotency: None,
        command: Command::Import(vec![
            Imported::hold(HoldRow {
                payment: PaymentId::from_u128(u128::MAX),
                hold,
            }),
            Imported::hold(HoldRow {
                payment: PaymentId::from_u128(1 << 100),
                hold: Hold {
                    status: HoldStatus::Captured,
                    amount_authorized: Amount::from_micros(1_000),
                    amount_captured: Amount::from_micros(600),
                    fee_captured: Amount::from_micros(18),
                    expires_at: Timestamp(40),
                    resolved_at: Some(Timestamp(30)),
                    transfers: [TransferId(20), TransferId(21), TransferId(22)],
                },
            }),
        ]),
    }
}

/// One record of each hold command, and of each way a capture names its amount and a
/// caller, ending with the import of holds.
fn hold_records() -> Vec<Record> {
    let usd = Currency::parse("USD").unwrap();
    let payment = PaymentId::from_u128(1 << 100);
    let merchant = MerchantId::from_u128(u128::MAX - 1);
    let claim = IdempotencyClaim {
        key: IdempotencyKey {
            principal: Principal::Merchant(merchant),
            key: "capture-1".into(),
        },
        fingerprint: [9; 32],
    };
    let record = |now: u64, idempotency: Option<IdempotencyClaim>, command| Record {
        now: Timestamp(now),
        idempotency,
        command,
    };
    vec![
        record(
            20,
            None,
            Command::from(HoldCommand::Authorize {
                pay: PayCommand {
                    id: payment,
                    payer: PayerId::from_u128(3),
                    merchant,
                    amount: Amount::from_micros(1_000),
                    currency: usd,
                    description: Some("tenue".into()),
                    reference: None,
                    transfer_ids: [TransferId(20), TransferId(22)],
                },
                expires_at: Timestamp(40),
                settle_id: TransferId(21),
            }),
        ),
        record(
            30,
            Some(claim),
            Command::from(HoldCommand::Capture {
                payment,
                amount: Some(Amount::from_micros(600)),
                caller: Principal::Merchant(merchant),
            }),
        ),
        record(
            31,
            None,
            Command::from(HoldCommand::Capture {
                payment,
                amount: None,
                caller: Principal::Operator,
            }),
        ),
        record(
            32,
            None,
            Command::from(HoldCommand::Capture {
                payment,
                amount: Some(Amount::ZERO),
                caller: Principal::Payer(PayerId::from_u128(3)),
            }),
        ),
        record(
            33,
            None,
            Command::from(HoldCommand::Cancel {
                payment,
                caller: Principal::Operator,
            }),
        ),
        record(
            u64::MAX,
            None,
            Command::from(HoldCommand::Expire {
                at: Timestamp(u64::MAX - 1),
            }),
        ),
        import_of_holds(),
    ]
}

/// `hold_records` as the version that brought holds writes them, one record a line.
const HOLD_FORMAT: &[&[&str]] = &[
    &[
        "021400000000000000000a0000000000000000000000001000000003000000000000000000000000000000fe",
        "ffffffffffffffffffffffffffffffe80300000000000055534400010500000074656e756500140000000000",
        "0000000000000000000016000000000000000000000000000000280000000000000015000000000000000000",
        "000000000000",
    ],
    &[
        "021e000000000000000102feffffffffffffffffffffffffffffff09000000636170747572652d3109090909",
        "090909090909090909090909090909090909090909090909090909090b000000000000000000000000100000",
        "0001580200000000000002feffffffffffffffffffffffffffffff",
    ],
    &["021f00000000000000000b000000000000000000000000100000000001"],
    &[
        "022000000000000000000b000000000000000000000000100000000100000000000000000303000000000000",
        "000000000000000000",
    ],
    &["022100000000000000000c0000000000000000000000001000000001"],
    &["02ffffffffffffffff000dfeffffffffffffff"],
    &[
        "0213000000000000000009020000000b68ffffffffffffffffffffffffffffffff01ffffffffffffffff0000",
        "0000000000000000000000000000ffffffffffffffff00ffffffffffffffffffffffffffffffff0100000000",
        "0000000000000000000000000000000000000001000000000000000b68000000000000000000000000100000",
        "0002e803000000000000580200000000000012000000000000002800000000000000011e0000000000000014",
        "0000000000000000000000000000001500000000000000000000000000000016000000000000000000000000",
        "000000",
    ],
];

#[test]
fn hold_commands_and_imported_holds_decode_to_themselves() {
    for record in hold_records() {
        let mut bytes = Vec::new();
        codec::encode(&record, &mut bytes);
        assert_eq!(codec::decode(&bytes), Ok(record.clone()), "{record:?}");
        for len in 0..bytes.len() {
            assert!(
                codec::decode(&bytes[..len]).is_err(),
                "{record:?} cut to {len} bytes decodes"
            );
        }
    }
}

#[test]
fn hold_records_are_written_as_they_were_when_holds_shipped() {
    let records = hold_records();
    assert_eq!(records.len(), HOLD_FORMAT.len());
    for (record, hex) in records.into_iter().zip(HOLD_FORMAT) {
        let mut bytes = Vec::new();
        codec::encode(&record, &mut bytes);
        assert_eq!(bytes, bytes_of(hex), "{record:?}");
        assert_eq!(codec::decode(&bytes_of(hex)), Ok(record));
    }
}
