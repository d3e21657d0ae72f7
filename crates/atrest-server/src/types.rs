//! PostgreSQL types for SQLite values: which OID a column is announced
//! with, and how values travel in text and binary format both ways.
//!
//! SQLite types values, not columns. A column's PostgreSQL type comes from
//! its declared type when it has one (`INTEGER` -> int8, `TEXT` -> text,
//! `TIMESTAMP` -> timestamp ...), otherwise from the first value the query
//! produces. Values that do not fit the announced type are converted where
//! PostgreSQL would (an integer in a float column) and otherwise are an
//! error that names the column, never a silently wrong value.

use bytes::{BufMut, BytesMut};
use rusqlite::types::{Value, ValueRef};

/// The PostgreSQL types atrest announces. Only built-in OIDs, so clients
/// never have to look types up in a catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PgType {
    Bool,
    Bytea,
    Int2,
    Int4,
    Int8,
    Text,
    Varchar,
    Name,
    Json,
    Jsonb,
    Float4,
    Float8,
    Numeric,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    Uuid,
    Unknown,
}

impl PgType {
    pub fn oid(self) -> u32 {
        match self {
            PgType::Bool => 16,
            PgType::Bytea => 17,
            PgType::Name => 19,
            PgType::Int8 => 20,
            PgType::Int2 => 21,
            PgType::Int4 => 23,
            PgType::Text => 25,
            PgType::Json => 114,
            PgType::Float4 => 700,
            PgType::Float8 => 701,
            PgType::Unknown => 705,
            PgType::Varchar => 1043,
            PgType::Date => 1082,
            PgType::Time => 1083,
            PgType::Timestamp => 1114,
            PgType::Timestamptz => 1184,
            PgType::Numeric => 1700,
            PgType::Uuid => 2950,
            PgType::Jsonb => 3802,
        }
    }

    pub fn from_oid(oid: u32) -> Option<PgType> {
        Some(match oid {
            16 => PgType::Bool,
            17 => PgType::Bytea,
            19 => PgType::Name,
            20 => PgType::Int8,
            21 => PgType::Int2,
            23 => PgType::Int4,
            25 => PgType::Text,
            114 => PgType::Json,
            700 => PgType::Float4,
            701 => PgType::Float8,
            705 => PgType::Unknown,
            1042 | 1043 => PgType::Varchar,
            1082 => PgType::Date,
            1083 => PgType::Time,
            1114 => PgType::Timestamp,
            1184 => PgType::Timestamptz,
            1700 => PgType::Numeric,
            2950 => PgType::Uuid,
            3802 => PgType::Jsonb,
            _ => return None,
        })
    }

    /// `typlen` as RowDescription reports it (-1: variable).
    pub fn size(self) -> i16 {
        match self {
            PgType::Bool => 1,
            PgType::Int2 => 2,
            PgType::Int4 | PgType::Float4 | PgType::Date => 4,
            PgType::Int8 | PgType::Float8 | PgType::Time => 8,
            PgType::Timestamp | PgType::Timestamptz => 8,
            PgType::Uuid => 16,
            PgType::Name => 64,
            _ => -1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PgType::Bool => "boolean",
            PgType::Bytea => "bytea",
            PgType::Int2 => "smallint",
            PgType::Int4 => "integer",
            PgType::Int8 => "bigint",
            PgType::Text => "text",
            PgType::Varchar => "character varying",
            PgType::Name => "name",
            PgType::Json => "json",
            PgType::Jsonb => "jsonb",
            PgType::Float4 => "real",
            PgType::Float8 => "double precision",
            PgType::Numeric => "numeric",
            PgType::Date => "date",
            PgType::Time => "time",
            PgType::Timestamp => "timestamp",
            PgType::Timestamptz => "timestamptz",
            PgType::Uuid => "uuid",
            PgType::Unknown => "unknown",
        }
    }

    /// The type of a column declared as `decl` in a CREATE TABLE.
    pub fn from_decltype(decl: &str) -> Option<PgType> {
        let d = decl.trim().to_ascii_uppercase();
        let base = d.split('(').next().unwrap_or("").trim();
        Some(match base {
            "" => return None,
            "BOOL" | "BOOLEAN" => PgType::Bool,
            "SMALLINT" | "INT2" | "TINYINT" => PgType::Int2,
            "INT" | "INT4" | "MEDIUMINT" => PgType::Int4,
            "INTEGER" | "BIGINT" | "INT8" => PgType::Int8,
            "REAL" | "FLOAT4" => PgType::Float4,
            "DOUBLE" | "DOUBLE PRECISION" | "FLOAT8" | "FLOAT" => PgType::Float8,
            "NUMERIC" | "DECIMAL" => PgType::Numeric,
            "TEXT" | "CLOB" => PgType::Text,
            "VARCHAR" | "CHARACTER VARYING" | "CHAR" | "CHARACTER" | "NVARCHAR" | "NCHAR"
            | "BPCHAR" => PgType::Varchar,
            "NAME" => PgType::Name,
            "BLOB" | "BYTEA" => PgType::Bytea,
            "DATE" => PgType::Date,
            "TIME" | "TIME WITHOUT TIME ZONE" => PgType::Time,
            "TIMESTAMP" | "DATETIME" | "TIMESTAMP WITHOUT TIME ZONE" => PgType::Timestamp,
            "TIMESTAMPTZ" | "TIMESTAMP WITH TIME ZONE" => PgType::Timestamptz,
            "UUID" => PgType::Uuid,
            "JSON" => PgType::Json,
            "JSONB" => PgType::Jsonb,
            // SQLite's affinity rules for everything else.
            other if other.contains("INT") => PgType::Int8,
            other if other.contains("CHAR") || other.contains("CLOB") || other.contains("TEXT") => {
                PgType::Text
            }
            other if other.contains("BLOB") => PgType::Bytea,
            other if other.contains("REAL") || other.contains("FLOA") || other.contains("DOUB") => {
                PgType::Float8
            }
            _ => PgType::Numeric,
        })
    }

    /// The type of a column with no declared type, from a value.
    pub fn of_value(v: ValueRef<'_>) -> PgType {
        match v {
            ValueRef::Null => PgType::Text,
            ValueRef::Integer(_) => PgType::Int8,
            ValueRef::Real(_) => PgType::Float8,
            ValueRef::Text(_) => PgType::Text,
            ValueRef::Blob(_) => PgType::Bytea,
        }
    }
}

/// A value that does not fit its column's announced type, or a parameter
/// that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TypeError {
    /// SQLSTATE: 22P02 invalid text representation, 22003 out of range,
    /// 42804 datatype mismatch, 22021 bad UTF-8, 0A000 unsupported.
    pub code: &'static str,
    pub message: String,
}

fn terr(code: &'static str, message: String) -> TypeError {
    TypeError { code, message }
}

fn sqlite_kind(v: ValueRef<'_>) -> &'static str {
    match v {
        ValueRef::Null => "null",
        ValueRef::Integer(_) => "integer",
        ValueRef::Real(_) => "real",
        ValueRef::Text(_) => "text",
        ValueRef::Blob(_) => "blob",
    }
}

fn mismatch(ty: PgType, v: ValueRef<'_>) -> TypeError {
    terr(
        "42804",
        format!(
            "a {} value does not fit the column's type {}; CAST it in the query or fix the stored value",
            sqlite_kind(v),
            ty.name()
        ),
    )
}

/// PostgreSQL's text form of a float8.
pub fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{f}")
    }
}

fn as_i64(ty: PgType, v: ValueRef<'_>) -> Result<i64, TypeError> {
    let n = match v {
        ValueRef::Integer(i) => i,
        ValueRef::Real(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => f as i64,
        ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| mismatch(ty, v))?,
        _ => return Err(mismatch(ty, v)),
    };
    let (lo, hi) = match ty {
        PgType::Int2 => (i16::MIN as i64, i16::MAX as i64),
        PgType::Int4 => (i32::MIN as i64, i32::MAX as i64),
        _ => (i64::MIN, i64::MAX),
    };
    if n < lo || n > hi {
        return Err(terr(
            "22003",
            format!("value {n} is out of range for type {}", ty.name()),
        ));
    }
    Ok(n)
}

fn as_f64(ty: PgType, v: ValueRef<'_>) -> Result<f64, TypeError> {
    match v {
        ValueRef::Integer(i) => Ok(i as f64),
        ValueRef::Real(f) => Ok(f),
        ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|s| parse_float(s.trim()))
            .ok_or_else(|| mismatch(ty, v)),
        _ => Err(mismatch(ty, v)),
    }
}

fn parse_float(s: &str) -> Option<f64> {
    match s.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "infinity" | "inf" | "+infinity" => Some(f64::INFINITY),
        "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
        other => other.parse().ok(),
    }
}

fn as_bool(ty: PgType, v: ValueRef<'_>) -> Result<bool, TypeError> {
    match v {
        ValueRef::Integer(i) => Ok(i != 0),
        ValueRef::Real(f) => Ok(f != 0.0),
        ValueRef::Text(t) => {
            parse_bool(std::str::from_utf8(t).unwrap_or("")).ok_or_else(|| mismatch(ty, v))
        }
        _ => Err(mismatch(ty, v)),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn as_text(ty: PgType, v: ValueRef<'_>) -> Result<String, TypeError> {
    match v {
        ValueRef::Integer(i) => Ok(i.to_string()),
        ValueRef::Real(f) => Ok(float_text(f)),
        ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8(t.to_vec()).map_err(|_| {
            terr(
                "22021",
                format!(
                    "a {} value is not valid UTF-8 for type {}",
                    sqlite_kind(v),
                    ty.name()
                ),
            )
        }),
        ValueRef::Null => Err(mismatch(ty, v)),
    }
}

/// The bytes of a bytea value. Text in a bytea column is read the way
/// PostgreSQL reads a bytea literal: `\x` hex or escape format (a client
/// that wrote `'\x0102'` into a bytea column meant two bytes).
fn as_bytes(v: ValueRef<'_>) -> Result<std::borrow::Cow<'_, [u8]>, TypeError> {
    match v {
        ValueRef::Blob(b) => Ok(std::borrow::Cow::Borrowed(b)),
        ValueRef::Text(t) => Ok(std::str::from_utf8(t)
            .ok()
            .and_then(parse_bytea_text)
            .map(std::borrow::Cow::Owned)
            .unwrap_or(std::borrow::Cow::Borrowed(t))),
        _ => Err(mismatch(PgType::Bytea, v)),
    }
}

/// The text of a numeric value (no exponent, as PostgreSQL prints numeric).
fn numeric_text(v: ValueRef<'_>) -> Result<String, TypeError> {
    match v {
        ValueRef::Integer(i) => Ok(i.to_string()),
        ValueRef::Real(f) if f.is_finite() => Ok(format!("{f}")),
        ValueRef::Real(f) => Ok(float_text(f)),
        ValueRef::Text(t) => {
            let s = std::str::from_utf8(t).unwrap_or("").trim();
            if is_decimal(s) {
                Ok(s.to_string())
            } else {
                Err(mismatch(PgType::Numeric, v))
            }
        }
        _ => Err(mismatch(PgType::Numeric, v)),
    }
}

fn is_decimal(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let mut dots = 0;
    !s.is_empty()
        && s.chars().all(|c| {
            if c == '.' {
                dots += 1;
                true
            } else {
                c.is_ascii_digit()
            }
        })
        && dots <= 1
        && s != "."
}

/// Appends one DataRow field (length, bytes; -1 for NULL) for `v` as `ty`.
pub fn encode_field(
    out: &mut BytesMut,
    v: ValueRef<'_>,
    ty: PgType,
    binary: bool,
) -> Result<(), TypeError> {
    if let ValueRef::Null = v {
        out.put_i32(-1);
        return Ok(());
    }
    let len_at = out.len();
    out.put_i32(0);
    if binary {
        encode_binary(out, v, ty)?;
    } else {
        let text = encode_text(v, ty)?;
        out.put_slice(text.as_bytes());
    }
    let len = (out.len() - len_at - 4) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

fn encode_text(v: ValueRef<'_>, ty: PgType) -> Result<String, TypeError> {
    Ok(match ty {
        PgType::Bool => if as_bool(ty, v)? { "t" } else { "f" }.to_string(),
        PgType::Int2 | PgType::Int4 | PgType::Int8 => as_i64(ty, v)?.to_string(),
        PgType::Float4 | PgType::Float8 => float_text(as_f64(ty, v)?),
        PgType::Numeric => numeric_text(v)?,
        PgType::Bytea => format!("\\x{}", hex::encode(as_bytes(v)?)),
        _ => as_text(ty, v)?,
    })
}

fn encode_binary(out: &mut BytesMut, v: ValueRef<'_>, ty: PgType) -> Result<(), TypeError> {
    match ty {
        PgType::Bool => out.put_u8(as_bool(ty, v)? as u8),
        PgType::Int2 => out.put_i16(as_i64(ty, v)? as i16),
        PgType::Int4 => out.put_i32(as_i64(ty, v)? as i32),
        PgType::Int8 => out.put_i64(as_i64(ty, v)?),
        PgType::Float4 => out.put_f32(as_f64(ty, v)? as f32),
        PgType::Float8 => out.put_f64(as_f64(ty, v)?),
        PgType::Numeric => numeric_binary(out, &numeric_text(v)?)?,
        PgType::Bytea => out.put_slice(&as_bytes(v)?),
        PgType::Jsonb => {
            out.put_u8(1);
            out.put_slice(as_text(ty, v)?.as_bytes());
        }
        PgType::Uuid => {
            let s = as_text(ty, v)?;
            out.put_slice(&parse_uuid(&s).ok_or_else(|| bad_text(ty, &s))?);
        }
        PgType::Date => {
            let s = as_text(ty, v)?;
            let days = parse_date(&s).ok_or_else(|| bad_text(ty, &s))?;
            out.put_i32((days - PG_EPOCH_DAYS) as i32);
        }
        PgType::Time => {
            let s = as_text(ty, v)?;
            out.put_i64(parse_time(&s).ok_or_else(|| bad_text(ty, &s))?);
        }
        PgType::Timestamp | PgType::Timestamptz => {
            let s = as_text(ty, v)?;
            let us =
                parse_timestamp(&s, ty == PgType::Timestamptz).ok_or_else(|| bad_text(ty, &s))?;
            out.put_i64(us);
        }
        _ => out.put_slice(as_text(ty, v)?.as_bytes()),
    }
    Ok(())
}

fn bad_text(ty: PgType, s: &str) -> TypeError {
    let shown: String = s.chars().take(64).collect();
    terr(
        "22P02",
        format!("invalid input syntax for type {}: \"{shown}\"", ty.name()),
    )
}

/// Decodes a Bind parameter sent as `oid` in text or binary format.
pub fn decode_param(raw: Option<&[u8]>, oid: u32, binary: bool) -> Result<Value, TypeError> {
    let Some(raw) = raw else {
        return Ok(Value::Null);
    };
    let ty = PgType::from_oid(oid).unwrap_or(PgType::Unknown);
    if binary {
        if ty == PgType::Unknown && oid != 0 && oid != 705 {
            return Err(terr(
                "0A000",
                format!("binary format for parameters of type oid {oid} is not supported; send it as text"),
            ));
        }
        return decode_binary(raw, ty, oid);
    }
    let text = std::str::from_utf8(raw)
        .map_err(|_| terr("22021", "parameter is not valid UTF-8".to_string()))?;
    Ok(match ty {
        PgType::Bool => Value::Integer(parse_bool(text).ok_or_else(|| bad_text(ty, text))? as i64),
        PgType::Int2 | PgType::Int4 | PgType::Int8 => {
            let n: i64 = text.trim().parse().map_err(|_| bad_text(ty, text))?;
            as_i64(ty, ValueRef::Integer(n))?;
            Value::Integer(n)
        }
        PgType::Float4 | PgType::Float8 => {
            Value::Real(parse_float(text.trim()).ok_or_else(|| bad_text(ty, text))?)
        }
        PgType::Numeric => {
            let t = text.trim();
            if !is_decimal(t) && parse_float(t).is_none() {
                return Err(bad_text(ty, text));
            }
            match t.parse::<i64>() {
                Ok(n) => Value::Integer(n),
                Err(_) => Value::Text(t.to_string()),
            }
        }
        PgType::Bytea => Value::Blob(parse_bytea_text(text).ok_or_else(|| bad_text(ty, text))?),
        _ => Value::Text(text.to_string()),
    })
}

fn decode_binary(raw: &[u8], ty: PgType, oid: u32) -> Result<Value, TypeError> {
    let need = |n: usize| -> Result<(), TypeError> {
        if raw.len() == n {
            Ok(())
        } else {
            Err(terr(
                "08P01",
                format!(
                    "binary {} parameter has {} bytes, expected {n}",
                    ty.name(),
                    raw.len()
                ),
            ))
        }
    };
    let utf8 = |b: &[u8]| -> Result<String, TypeError> {
        String::from_utf8(b.to_vec())
            .map_err(|_| terr("22021", "parameter is not valid UTF-8".into()))
    };
    Ok(match ty {
        PgType::Bool => {
            need(1)?;
            Value::Integer((raw[0] != 0) as i64)
        }
        PgType::Int2 => {
            need(2)?;
            Value::Integer(i16::from_be_bytes([raw[0], raw[1]]) as i64)
        }
        PgType::Int4 => {
            need(4)?;
            Value::Integer(i32::from_be_bytes(raw.try_into().expect("4 bytes")) as i64)
        }
        PgType::Int8 => {
            need(8)?;
            Value::Integer(i64::from_be_bytes(raw.try_into().expect("8 bytes")))
        }
        PgType::Float4 => {
            need(4)?;
            Value::Real(f32::from_be_bytes(raw.try_into().expect("4 bytes")) as f64)
        }
        PgType::Float8 => {
            need(8)?;
            Value::Real(f64::from_be_bytes(raw.try_into().expect("8 bytes")))
        }
        PgType::Bytea => Value::Blob(raw.to_vec()),
        PgType::Jsonb => match raw.split_first() {
            Some((1, rest)) => Value::Text(utf8(rest)?),
            _ => return Err(terr("22P02", "unsupported jsonb binary version".into())),
        },
        PgType::Uuid => {
            need(16)?;
            Value::Text(format_uuid(raw))
        }
        PgType::Date => {
            need(4)?;
            let d = i32::from_be_bytes(raw.try_into().expect("4 bytes")) as i64;
            Value::Text(format_date(d + PG_EPOCH_DAYS))
        }
        PgType::Time => {
            need(8)?;
            let us = i64::from_be_bytes(raw.try_into().expect("8 bytes"));
            Value::Text(format_time(us))
        }
        PgType::Timestamp | PgType::Timestamptz => {
            need(8)?;
            let us = i64::from_be_bytes(raw.try_into().expect("8 bytes"));
            let mut s = format_timestamp(us);
            if ty == PgType::Timestamptz {
                s.push_str("+00");
            }
            Value::Text(s)
        }
        PgType::Numeric => {
            let s = numeric_from_binary(raw)
                .ok_or_else(|| terr("08P01", "malformed binary numeric parameter".into()))?;
            match s.parse::<i64>() {
                Ok(n) => Value::Integer(n),
                Err(_) => Value::Text(s),
            }
        }
        PgType::Unknown if oid != 0 && oid != 705 => {
            return Err(terr(
                "0A000",
                format!("unsupported parameter type oid {oid}"),
            ))
        }
        _ => Value::Text(utf8(raw)?),
    })
}

fn parse_bytea_text(s: &str) -> Option<Vec<u8>> {
    if let Some(h) = s.strip_prefix("\\x") {
        return hex::decode(h).ok();
    }
    // Escape format: backslash-octal and doubled backslashes.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
            } else {
                let oct = b.get(i + 1..i + 4)?;
                let s = std::str::from_utf8(oct).ok()?;
                out.push(u8::from_str_radix(s, 8).ok()?);
                i += 4;
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

// ---- dates and times (proleptic Gregorian, days since 1970-01-01) ----

/// 2000-01-01, PostgreSQL's epoch, in days since the Unix epoch.
const PG_EPOCH_DAYS: i64 = 10957;
const US_PER_DAY: i64 = 86_400_000_000;

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn parse_date(s: &str) -> Option<i64> {
    let s = s.trim();
    let mut it = s.get(..10)?.split('-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // Reject 2023-02-30 and friends.
    (civil_from_days(days) == (y, m, d)).then_some(days)
}

fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let (hms, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let mut it = hms.split(':');
    let h: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let sec: i64 = it.next().unwrap_or("0").parse().ok()?;
    if h > 24 || m > 59 || sec > 60 {
        return None;
    }
    let digits: String = frac.chars().take_while(|c| c.is_ascii_digit()).collect();
    let us = if digits.is_empty() {
        0
    } else {
        let padded = format!("{:0<6}", &digits[..digits.len().min(6)]);
        padded.parse::<i64>().ok()?
    };
    Some(((h * 60 + m) * 60 + sec) * 1_000_000 + us)
}

/// Microseconds since 2000-01-01 00:00 (UTC for timestamptz).
fn parse_timestamp(s: &str, with_zone: bool) -> Option<i64> {
    let s = s.trim();
    let days = parse_date(s)?;
    let rest = s.get(10..)?.trim_start_matches(['T', 't', ' ']);
    let (time, offset_s) = if rest.is_empty() {
        ("00:00:00", 0)
    } else {
        // Offset: Z, +HH, +HH:MM, -HHMM after the time.
        let pos = rest
            .char_indices()
            .skip(1)
            .find(|(_, c)| matches!(c, '+' | '-' | 'Z' | 'z'))
            .map(|(i, _)| i);
        match pos {
            Some(p) => {
                let (t, off) = rest.split_at(p);
                let secs = if off.eq_ignore_ascii_case("z") {
                    0
                } else {
                    let sign = if off.starts_with('-') { -1 } else { 1 };
                    let digits: String = off[1..].chars().filter(|c| c.is_ascii_digit()).collect();
                    let (hh, mm) = match digits.len() {
                        2 => (digits.parse::<i64>().ok()?, 0),
                        4 => (
                            digits[..2].parse::<i64>().ok()?,
                            digits[2..].parse::<i64>().ok()?,
                        ),
                        _ => return None,
                    };
                    sign * (hh * 3600 + mm * 60)
                };
                (t.trim(), secs)
            }
            None => (rest, 0),
        }
    };
    let us = parse_time(time)?;
    let offset_us = if with_zone { offset_s * 1_000_000 } else { 0 };
    Some((days - PG_EPOCH_DAYS) * US_PER_DAY + us - offset_us)
}

fn format_date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

fn format_time(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if frac == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{frac:06}")
    }
}

fn format_timestamp(us: i64) -> String {
    let days = us.div_euclid(US_PER_DAY) + PG_EPOCH_DAYS;
    let in_day = us.rem_euclid(US_PER_DAY);
    format!("{} {}", format_date(days), format_time(in_day))
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let h: String = s
        .trim()
        .trim_matches(['{', '}'])
        .chars()
        .filter(|c| *c != '-')
        .collect();
    let v = hex::decode(h).ok()?;
    v.try_into().ok()
}

fn format_uuid(b: &[u8]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---- numeric binary format: base-10000 digits ----

fn numeric_binary(out: &mut BytesMut, s: &str) -> Result<(), TypeError> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("nan") {
        out.put_slice(&[0, 0, 0, 0, 0xC0, 0, 0, 0]);
        return Ok(());
    }
    if !is_decimal(s) {
        return Err(terr(
            "22P02",
            format!("value {s:?} cannot be sent as binary numeric"),
        ));
    }
    let neg = s.starts_with('-');
    let s = s.trim_start_matches(['-', '+']);
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let int = int.trim_start_matches('0');
    let dscale = frac.len() as u16;
    // Pad the integer part to a multiple of 4 on the left, the fraction on the right.
    let ipad = (4 - int.len() % 4) % 4;
    let fpad = (4 - frac.len() % 4) % 4;
    let digits_str = format!("{}{int}{frac}{}", "0".repeat(ipad), "0".repeat(fpad));
    let mut digits: Vec<i16> = digits_str
        .as_bytes()
        .chunks(4)
        .map(|c| {
            std::str::from_utf8(c)
                .expect("ascii")
                .parse::<i16>()
                .expect("digits")
        })
        .collect();
    let mut weight = ((int.len() + ipad) / 4) as i16 - 1;
    // Strip leading and trailing zero groups.
    while digits.first() == Some(&0) {
        digits.remove(0);
        weight -= 1;
    }
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    out.put_i16(digits.len() as i16);
    out.put_i16(weight);
    out.put_u16(if neg && !digits.is_empty() { 0x4000 } else { 0 });
    out.put_u16(dscale);
    for d in digits {
        out.put_i16(d);
    }
    Ok(())
}

fn numeric_from_binary(raw: &[u8]) -> Option<String> {
    let rd =
        |i: usize| -> Option<i16> { Some(i16::from_be_bytes([*raw.get(i)?, *raw.get(i + 1)?])) };
    let ndigits = rd(0)? as usize;
    let weight = rd(2)? as i64;
    let sign = rd(4)? as u16;
    let dscale = rd(6)? as usize;
    if raw.len() != 8 + 2 * ndigits {
        return None;
    }
    if sign == 0xC000 {
        return Some("NaN".into());
    }
    let digits: Vec<i64> = (0..ndigits)
        .map(|i| rd(8 + 2 * i).map(|d| d as i64))
        .collect::<Option<_>>()?;
    let mut int = String::new();
    for w in 0..=weight.max(-1) {
        let d = digits.get(w as usize).copied().unwrap_or(0);
        if int.is_empty() {
            if d != 0 {
                int = d.to_string();
            }
        } else {
            int.push_str(&format!("{d:04}"));
        }
    }
    if int.is_empty() {
        int = "0".into();
    }
    let mut frac = String::new();
    let mut pos = weight + 1;
    while frac.len() < dscale {
        let d = if pos < 0 {
            0
        } else {
            digits.get(pos as usize).copied().unwrap_or(0)
        };
        frac.push_str(&format!("{d:04}"));
        pos += 1;
    }
    frac.truncate(dscale);
    let mut s = if sign == 0x4000 {
        "-".to_string()
    } else {
        String::new()
    };
    s.push_str(&int);
    if dscale > 0 {
        s.push('.');
        s.push_str(&frac);
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(v: ValueRef<'_>, ty: PgType, binary: bool) -> Result<Vec<u8>, TypeError> {
        let mut out = BytesMut::new();
        encode_field(&mut out, v, ty, binary)?;
        let len = i32::from_be_bytes(out[..4].try_into().unwrap());
        assert_eq!(len as usize, out.len() - 4);
        Ok(out[4..].to_vec())
    }

    #[test]
    fn decltypes_map_like_sqlite_affinity() {
        assert_eq!(PgType::from_decltype("INTEGER"), Some(PgType::Int8));
        assert_eq!(PgType::from_decltype("int"), Some(PgType::Int4));
        assert_eq!(PgType::from_decltype("varchar(20)"), Some(PgType::Varchar));
        assert_eq!(
            PgType::from_decltype("double precision"),
            Some(PgType::Float8)
        );
        assert_eq!(
            PgType::from_decltype("numeric(10,2)"),
            Some(PgType::Numeric)
        );
        assert_eq!(
            PgType::from_decltype("timestamp with time zone"),
            Some(PgType::Timestamptz)
        );
        assert_eq!(
            PgType::from_decltype("UNSIGNED BIG INT"),
            Some(PgType::Int8)
        );
        assert_eq!(PgType::from_decltype(""), None);
    }

    #[test]
    fn text_and_binary_encodings() {
        assert_eq!(
            field(ValueRef::Integer(42), PgType::Int8, false).unwrap(),
            b"42"
        );
        assert_eq!(
            field(ValueRef::Integer(42), PgType::Int4, true).unwrap(),
            42i32.to_be_bytes()
        );
        assert_eq!(
            field(ValueRef::Integer(1), PgType::Bool, false).unwrap(),
            b"t"
        );
        assert_eq!(
            field(ValueRef::Real(1.5), PgType::Float8, false).unwrap(),
            b"1.5"
        );
        assert_eq!(
            field(ValueRef::Integer(3), PgType::Float8, true).unwrap(),
            3f64.to_be_bytes()
        );
        assert_eq!(
            field(ValueRef::Blob(&[0, 255]), PgType::Bytea, false).unwrap(),
            b"\\x00ff"
        );
        assert_eq!(
            field(ValueRef::Integer(7), PgType::Text, false).unwrap(),
            b"7"
        );
        // A bytea literal stored as text reads back as its bytes.
        assert_eq!(
            field(ValueRef::Text(b"\\x0102"), PgType::Bytea, true).unwrap(),
            [1, 2]
        );
        assert_eq!(
            field(ValueRef::Text(b"ab"), PgType::Bytea, false).unwrap(),
            b"\\x6162"
        );
        let mut null = BytesMut::new();
        encode_field(&mut null, ValueRef::Null, PgType::Int8, true).unwrap();
        assert_eq!(&null[..], (-1i32).to_be_bytes());
    }

    #[test]
    fn values_that_do_not_fit_are_errors_not_garbage() {
        let e = field(ValueRef::Text(b"abc"), PgType::Int8, false).unwrap_err();
        assert_eq!(e.code, "42804");
        let e = field(ValueRef::Integer(1 << 40), PgType::Int4, true).unwrap_err();
        assert_eq!(e.code, "22003");
        let e = field(ValueRef::Blob(&[0xff, 0xfe]), PgType::Text, false).unwrap_err();
        assert_eq!(e.code, "22021");
    }

    #[test]
    fn dates_and_times_round_trip_through_binary() {
        let d = field(ValueRef::Text(b"2000-01-02"), PgType::Date, true).unwrap();
        assert_eq!(d, 1i32.to_be_bytes());
        let back = decode_param(Some(&d), 1082, true).unwrap();
        assert_eq!(back, Value::Text("2000-01-02".into()));
        let ts = field(
            ValueRef::Text(b"2026-11-22 10:30:00.25"),
            PgType::Timestamp,
            true,
        )
        .unwrap();
        let back = decode_param(Some(&ts), 1114, true).unwrap();
        assert_eq!(back, Value::Text("2026-11-22 10:30:00.250000".into()));
        let tz = field(
            ValueRef::Text(b"2026-11-22T10:30:00+02:00"),
            PgType::Timestamptz,
            true,
        )
        .unwrap();
        let utc = field(
            ValueRef::Text(b"2026-11-22 08:30:00Z"),
            PgType::Timestamptz,
            true,
        )
        .unwrap();
        assert_eq!(tz, utc);
        assert_eq!(
            field(ValueRef::Text(b"1969-12-31"), PgType::Date, true).unwrap(),
            (-10958i32).to_be_bytes()
        );
        assert_eq!(
            field(ValueRef::Text(b"2023-02-30"), PgType::Date, true)
                .unwrap_err()
                .code,
            "22P02"
        );
    }

    #[test]
    fn numeric_binary_round_trips() {
        for s in [
            "0",
            "1",
            "-1",
            "12345.678",
            "0.0001",
            "-0.5",
            "10000",
            "99999999999999999999.12",
            "1.10",
        ] {
            let mut out = BytesMut::new();
            numeric_binary(&mut out, s).unwrap();
            let back = numeric_from_binary(&out).unwrap();
            let expect = if s == "-0.5" {
                "-0.5".to_string()
            } else {
                s.to_string()
            };
            assert_eq!(back, expect, "{s}");
        }
        // PostgreSQL's own encoding of 12345.678: 3 digits, weight 1, dscale 3.
        let mut out = BytesMut::new();
        numeric_binary(&mut out, "12345.678").unwrap();
        assert_eq!(
            &out[..],
            [0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1a, 0x7c]
        );
    }

    #[test]
    fn params_decode_or_fail_clearly() {
        assert_eq!(
            decode_param(Some(b"12"), 23, false).unwrap(),
            Value::Integer(12)
        );
        assert_eq!(
            decode_param(Some(b"true"), 16, false).unwrap(),
            Value::Integer(1)
        );
        assert_eq!(
            decode_param(Some(b"\\x0102"), 17, false).unwrap(),
            Value::Blob(vec![1, 2])
        );
        assert_eq!(
            decode_param(Some(b"a\\\\b\\001"), 17, false).unwrap(),
            Value::Blob(b"a\\b\x01".to_vec())
        );
        assert_eq!(decode_param(None, 23, true).unwrap(), Value::Null);
        assert_eq!(
            decode_param(Some(b"x1"), 20, false).unwrap_err().code,
            "22P02"
        );
        assert_eq!(
            decode_param(Some(b"99999"), 21, false).unwrap_err().code,
            "22003"
        );
        assert_eq!(
            decode_param(Some(&[0, 0, 1]), 23, true).unwrap_err().code,
            "08P01"
        );
        assert_eq!(
            decode_param(Some(b"x"), 600, true).unwrap_err().code,
            "0A000"
        );
        let u = decode_param(Some(&[0x12; 16]), 2950, true).unwrap();
        assert_eq!(
            u,
            Value::Text("12121212-1212-1212-1212-121212121212".into())
        );
    }
}
