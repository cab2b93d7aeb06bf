//! A checkpoint's state changes, gathered in one buffer, come out in strictly increasing key
//! order with the last change of each key, as a map that takes them one by one would hold
//! them.

use std::collections::BTreeMap;

use farthing_payments::disk::StateChanges;
use proptest::prelude::*;

/// Keys that share long prefixes and differ past their 16th byte, so that ties of the
/// leading bytes are common; of several lengths, one of them empty past the kind.
fn key() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![b'a', b'g', b'p']),
        0usize..3,
        prop::collection::vec(0u8..3, 0..20),
    )
        .prop_map(|(kind, zeros, tail)| {
            let mut key = vec![kind];
            key.extend(std::iter::repeat_n(0u8, zeros * 8));
            key.extend(tail);
            key
        })
}

fn change() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
    (
        key(),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..12)),
    )
}

type Changes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Gives `changes` to `gathered` and returns what comes out, with what a map holds after
/// taking them one by one.
fn gather(gathered: &mut StateChanges, changes: &Changes) -> (Changes, Changes) {
    let mut model = BTreeMap::new();
    for (key, value) in changes {
        match value {
            Some(value) => gathered.put(key, value),
            None => gathered.remove(key),
        }
        model.insert(key.clone(), value.clone());
    }
    assert_eq!(gathered.len(), changes.len());
    let out = gathered
        .in_key_order()
        .map(|(key, value)| (key.to_vec(), value.map(<[u8]>::to_vec)))
        .collect();
    (out, model.into_iter().collect())
}

proptest! {
    #[test]
    fn changes_come_out_in_key_order_with_the_last_of_each_key(
        changes in prop::collection::vec(change(), 0..60),
        next in prop::collection::vec(change(), 0..60),
    ) {
        let mut gathered = StateChanges::default();
        let (out, expected) = gather(&mut gathered, &changes);
        prop_assert_eq!(out, expected);
        // The buffer kept for the next checkpoint holds nothing of this one's.
        gathered.clear();
        prop_assert!(gathered.is_empty());
        let (out, expected) = gather(&mut gathered, &next);
        prop_assert_eq!(out, expected);
    }
}

#[test]
fn an_empty_value_is_kept_apart_from_a_removal() {
    let mut gathered = StateChanges::default();
    gathered.put(b"k1", b"");
    gathered.remove(b"k2");
    gathered.put_with(b"k0", |out| out.extend_from_slice(b"encoded"));
    let out: Vec<(&[u8], Option<&[u8]>)> = gathered.in_key_order().collect();
    assert_eq!(
        out,
        vec![
            (&b"k0"[..], Some(&b"encoded"[..])),
            (&b"k1"[..], Some(&b""[..])),
            (&b"k2"[..], None),
        ]
    );
}
