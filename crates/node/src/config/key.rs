//! Key-range bounds as written in the file. Keys are bytes; most deployments use readable keys, so
//! a bound is a TOML string (its UTF-8 bytes), and a bound that is not UTF-8 is an array of byte
//! values: `"m"` and `[109]` are the same bound.

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One end of a key range: a key, compared bytewise as the storage layer orders keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct KeyBound(pub Vec<u8>);

impl KeyBound {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for KeyBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "{:?}", self.0),
        }
    }
}

impl Serialize for KeyBound {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(s) => serializer.serialize_str(s),
            Err(_) => self.0.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for KeyBound {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeyBoundVisitor)
    }
}

struct KeyBoundVisitor;

impl<'de> Visitor<'de> for KeyBoundVisitor {
    type Value = KeyBound;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key: a string, or an array of byte values 0 to 255")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyBound, E> {
        Ok(KeyBound(v.as_bytes().to_vec()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyBound, A::Error> {
        let mut bytes = Vec::new();
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        Ok(KeyBound(bytes))
    }
}
