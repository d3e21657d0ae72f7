//! Types of `$n` parameters a client left unspecified, for Describe.
//!
//! PostgreSQL infers a parameter's type from where it appears; SQLite
//! does not type parameters at all. Strict clients (tokio-postgres) need
//! a type to encode a value, so atrest infers the common cases from the
//! statement's text and the tables' declared column types:
//! `col <op> $n`, `$n <op> col`, `INSERT INTO t (cols) VALUES (...)`,
//! `UPDATE t SET col = $n`, `LIMIT`/`OFFSET $n`. Anything else is text,
//! which every client can send.

use crate::sql::{self, Tok, Token};
use crate::types::PgType;

/// The inferred type of each of `n` parameters (`$1` first).
pub fn param_types(conn: &rusqlite::Connection, text: &str, n: usize) -> Vec<PgType> {
    let mut out = vec![PgType::Text; n];
    let Ok(tokens) = sql::tokenize(text) else {
        return out;
    };
    let s = |t: &Token| &text[t.start..t.end];
    let tables = tables_of(text, &tokens);
    let column_type = |col: &str| -> Option<PgType> {
        for t in &tables {
            if let Some(ty) = declared_type(conn, t, col) {
                return Some(ty);
            }
        }
        None
    };
    let param_at = |i: usize| -> Option<usize> {
        let t = tokens.get(i)?;
        if t.kind != Tok::Param {
            return None;
        }
        s(t).strip_prefix('$')?
            .parse::<usize>()
            .ok()
            .filter(|k| *k >= 1 && *k <= n)
            .map(|k| k - 1)
    };
    let is_op = |i: usize| {
        tokens.get(i).is_some_and(|t| {
            t.kind == Tok::Punct && matches!(s(t), "=" | "<" | ">" | "!")
                || t.kind == Tok::Word && s(t).eq_ignore_ascii_case("LIKE")
        })
    };
    // Operators are one punct token per character: walk over "<=", "<>", "!=".
    let op_span = |i: usize, forward: bool| -> usize {
        let mut k = 0;
        while k < 2 && is_op(if forward { i + k } else { i.wrapping_sub(k) }) {
            k += 1;
        }
        k
    };
    let mut set = |k: usize, ty: PgType| {
        if out[k] == PgType::Text {
            out[k] = ty;
        }
    };
    for i in 0..tokens.len() {
        let Some(k) = param_at(i) else { continue };
        // col <op> $k
        let back = op_span(i.wrapping_sub(1), false);
        if back > 0 && i > back {
            let c = &tokens[i - back - 1];
            if matches!(c.kind, Tok::Word | Tok::QuotedIdent) {
                if let Some(ty) = column_type(&unquote(s(c))) {
                    set(k, ty);
                    continue;
                }
            }
        }
        // $k <op> col
        let fwd = op_span(i + 1, true);
        if fwd > 0 {
            if let Some(c) = tokens.get(i + 1 + fwd) {
                if matches!(c.kind, Tok::Word | Tok::QuotedIdent) {
                    if let Some(ty) = column_type(&unquote(s(c))) {
                        set(k, ty);
                        continue;
                    }
                }
            }
        }
        // LIMIT $k / OFFSET $k
        if i > 0 && tokens[i - 1].kind == Tok::Word {
            let w = s(&tokens[i - 1]).to_ascii_uppercase();
            if w == "LIMIT" || w == "OFFSET" {
                set(k, PgType::Int8);
            }
        }
    }
    infer_insert(conn, text, &tokens, n, &mut out);
    out
}

fn unquote(s: &str) -> String {
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1].replace("\"\"", "\"")
    } else {
        s.to_string()
    }
}

/// Names after FROM, JOIN, UPDATE, INTO.
fn tables_of(text: &str, tokens: &[Token]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if t.kind != Tok::Word {
            continue;
        }
        let w = text[t.start..t.end].to_ascii_uppercase();
        if matches!(w.as_str(), "FROM" | "JOIN" | "UPDATE" | "INTO") {
            if let Some(n) = tokens.get(i + 1) {
                if matches!(n.kind, Tok::Word | Tok::QuotedIdent) {
                    out.push(unquote(&text[n.start..n.end]));
                }
            }
        }
    }
    out
}

fn table_columns(conn: &rusqlite::Connection, table: &str) -> Vec<(String, String)> {
    let Ok(mut st) = conn.prepare("SELECT name, type FROM pragma_table_info(?1)") else {
        return vec![];
    };
    st.query_map([table], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })
    .map(|it| it.filter_map(Result::ok).collect())
    .unwrap_or_default()
}

fn declared_type(conn: &rusqlite::Connection, table: &str, col: &str) -> Option<PgType> {
    table_columns(conn, table)
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(col))
        .and_then(|(_, t)| PgType::from_decltype(&t))
}

/// INSERT INTO t [(c1, c2, ...)] VALUES ($1, $2, ...), (...)
fn infer_insert(
    conn: &rusqlite::Connection,
    text: &str,
    tokens: &[Token],
    n: usize,
    out: &mut [PgType],
) {
    let s = |t: &Token| &text[t.start..t.end];
    let Some(into) = tokens
        .iter()
        .position(|t| t.kind == Tok::Word && s(t).eq_ignore_ascii_case("INTO"))
    else {
        return;
    };
    let Some(table) = tokens.get(into + 1).map(|t| unquote(s(t))) else {
        return;
    };
    let mut i = into + 2;
    let mut cols: Vec<String> = Vec::new();
    if tokens.get(i).is_some_and(|t| s(t) == "(") {
        i += 1;
        while let Some(t) = tokens.get(i) {
            i += 1;
            match s(t) {
                ")" => break,
                "," => {}
                name => cols.push(unquote(name)),
            }
        }
    } else {
        cols = table_columns(conn, &table)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    }
    if !tokens
        .get(i)
        .is_some_and(|t| s(t).eq_ignore_ascii_case("VALUES"))
    {
        return;
    }
    // Each tuple: position p of the tuple maps to cols[p].
    let mut depth = 0;
    let mut pos = 0;
    for t in &tokens[i + 1..] {
        match s(t) {
            "(" => {
                depth += 1;
                if depth == 1 {
                    pos = 0;
                }
            }
            ")" => depth -= 1,
            "," if depth == 1 => pos += 1,
            p if depth == 1 && t.kind == Tok::Param => {
                if let Some(k) = p.strip_prefix('$').and_then(|d| d.parse::<usize>().ok()) {
                    if k >= 1 && k <= n && out[k - 1] == PgType::Text {
                        if let Some(ty) = cols.get(pos).and_then(|c| declared_type(conn, &table, c))
                        {
                            out[k - 1] = ty;
                        }
                    }
                }
            }
            _ => {}
        }
        if depth < 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infers_from_columns_inserts_and_limits() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE acct (id INTEGER PRIMARY KEY, owner TEXT, balance INT, rate DOUBLE PRECISION, ok BOOLEAN, pic BLOB);",
        )
        .unwrap();
        let t = |sql: &str, n| param_types(&c, sql, n);
        assert_eq!(t("SELECT * FROM acct WHERE id = $1", 1), [PgType::Int8]);
        assert_eq!(
            t("SELECT * FROM acct WHERE $1 <= balance", 1),
            [PgType::Int4]
        );
        assert_eq!(
            t("UPDATE acct SET rate = $1, ok = $2 WHERE owner <> $3", 3),
            [PgType::Float8, PgType::Bool, PgType::Text]
        );
        assert_eq!(
            t("INSERT INTO acct (pic, id) VALUES ($1, $2)", 2),
            [PgType::Bytea, PgType::Int8]
        );
        assert_eq!(
            t("INSERT INTO acct VALUES ($1, $2, $3, $4, $5, $6)", 6),
            [
                PgType::Int8,
                PgType::Text,
                PgType::Int4,
                PgType::Float8,
                PgType::Bool,
                PgType::Bytea
            ]
        );
        assert_eq!(
            t("SELECT * FROM acct LIMIT $1 OFFSET $2", 2),
            [PgType::Int8, PgType::Int8]
        );
        // Unknown context: text.
        assert_eq!(t("SELECT $1", 1), [PgType::Text]);
    }
}
