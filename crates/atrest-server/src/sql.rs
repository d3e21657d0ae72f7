//! The PostgreSQL SQL surface atrest understands before SQLite sees a
//! statement: splitting a query string into statements, recognising the
//! commands the server answers itself (transactions, `SET`/`SHOW`,
//! `CREATE DATABASE`), and rewriting the few PostgreSQL spellings SQLite
//! lacks (`expr::type` casts, `serial` columns).
//!
//! This is a lexer, not a parser: it knows quotes, comments, dollar
//! quoting and parentheses, which is all the splitting and the rewrites
//! need. Everything else is SQLite's job.

/// A lexical token of a statement, with its byte span in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tok {
    /// A keyword or unquoted identifier.
    Word,
    /// `"quoted identifier"`.
    QuotedIdent,
    /// `'string'`, `E'string'`, `$$string$$`, `$tag$string$tag$`.
    Str,
    Number,
    /// `$1`, `?`, `:name`, `@name`.
    Param,
    /// Any other punctuation or operator (one token per character, except `::`).
    Punct,
}

#[derive(Debug, Clone, Copy)]
pub struct Token {
    pub kind: Tok,
    pub start: usize,
    pub end: usize,
}

/// Why a statement could not be lexed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    #[error("unterminated quoted string at or near byte {0}")]
    UnterminatedString(usize),
    #[error("unterminated quoted identifier at or near byte {0}")]
    UnterminatedIdent(usize),
    #[error("unterminated /* comment at or near byte {0}")]
    UnterminatedComment(usize),
    #[error("unterminated dollar-quoted string at or near byte {0}")]
    UnterminatedDollar(usize),
}

/// Splits `sql` into tokens; comments and whitespace are dropped.
pub fn tokenize(sql: &str) -> Result<Vec<Token>, LexError> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            _ if c.is_ascii_whitespace() => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // PostgreSQL block comments nest.
                let mut depth = 0usize;
                loop {
                    if i + 1 >= b.len() {
                        return Err(LexError::UnterminatedComment(start));
                    }
                    if b[i] == b'/' && b[i + 1] == b'*' {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b[i + 1] == b'/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                i = skip_quoted(b, i, b'\'').ok_or(LexError::UnterminatedString(start))?;
                out.push(Token {
                    kind: Tok::Str,
                    start,
                    end: i,
                });
            }
            b'E' | b'e' if b.get(i + 1) == Some(&b'\'') => {
                // Escape string: a backslash escapes the next byte.
                i += 2;
                loop {
                    match b.get(i) {
                        None => return Err(LexError::UnterminatedString(start)),
                        Some(b'\\') => i += 2,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                out.push(Token {
                    kind: Tok::Str,
                    start,
                    end: i,
                });
            }
            b'"' => {
                i = skip_quoted(b, i, b'"').ok_or(LexError::UnterminatedIdent(start))?;
                out.push(Token {
                    kind: Tok::QuotedIdent,
                    start,
                    end: i,
                });
            }
            b'$' => {
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits > 0 {
                    i += 1 + digits;
                    out.push(Token {
                        kind: Tok::Param,
                        start,
                        end: i,
                    });
                    continue;
                }
                // Dollar quote: $tag$ ... $tag$ (tag may be empty).
                let tag_len = b[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                    .count();
                if b.get(i + 1 + tag_len) == Some(&b'$') {
                    let tag = &b[i..i + tag_len + 2];
                    let body = i + tag.len();
                    let close = find(&b[body..], tag).ok_or(LexError::UnterminatedDollar(start))?;
                    i = body + close + tag.len();
                    out.push(Token {
                        kind: Tok::Str,
                        start,
                        end: i,
                    });
                } else {
                    i += 1;
                    out.push(Token {
                        kind: Tok::Punct,
                        start,
                        end: i,
                    });
                }
            }
            b'?' | b':' | b'@'
                if c != b':'
                    || b.get(i + 1)
                        .is_some_and(|n| n.is_ascii_alphabetic() || *n == b'_') =>
            {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Token {
                    kind: Tok::Param,
                    start,
                    end: i,
                });
            }
            b':' if b.get(i + 1) == Some(&b':') => {
                i += 2;
                out.push(Token {
                    kind: Tok::Punct,
                    start,
                    end: i,
                });
            }
            _ if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(|n| n.is_ascii_digit())) =>
            {
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'.'
                        || ((b[i] == b'+' || b[i] == b'-')
                            && matches!(b[i - 1], b'e' | b'E')
                            && !b[start..i].starts_with(b"0x")))
                {
                    i += 1;
                }
                out.push(Token {
                    kind: Tok::Number,
                    start,
                    end: i,
                });
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80)
                {
                    i += 1;
                }
                out.push(Token {
                    kind: Tok::Word,
                    start,
                    end: i,
                });
            }
            _ => {
                // One punctuation character (UTF-8 safe: ASCII here).
                i += 1;
                out.push(Token {
                    kind: Tok::Punct,
                    start,
                    end: i,
                });
            }
        }
    }
    Ok(out)
}

fn skip_quoted(b: &[u8], mut i: usize, q: u8) -> Option<usize> {
    i += 1;
    loop {
        match b.get(i)? {
            c if *c == q && b.get(i + 1) == Some(&q) => i += 2,
            c if *c == q => return Some(i + 1),
            _ => i += 1,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One statement of a query string, with its tokens (spans relative to `text`).
#[derive(Debug, Clone)]
pub struct Statement {
    pub text: String,
    pub tokens: Vec<Token>,
}

impl Statement {
    /// The `n`th token's text if it is a word, uppercased.
    pub fn word(&self, n: usize) -> Option<String> {
        let t = self.tokens.get(n)?;
        (t.kind == Tok::Word).then(|| self.text[t.start..t.end].to_ascii_uppercase())
    }

    pub fn token_text(&self, n: usize) -> Option<&str> {
        self.tokens.get(n).map(|t| &self.text[t.start..t.end])
    }

    /// The words of the statement from token `from`, uppercased (non-words
    /// as their text).
    pub fn words_from(&self, from: usize) -> Vec<String> {
        self.tokens[from.min(self.tokens.len())..]
            .iter()
            .map(|t| {
                let s = &self.text[t.start..t.end];
                if t.kind == Tok::Word {
                    s.to_ascii_uppercase()
                } else {
                    s.to_string()
                }
            })
            .collect()
    }
}

/// Splits a query string at top-level semicolons. Empty statements are
/// dropped, so `";;"` is no statement at all.
pub fn split(sql: &str) -> Result<Vec<Statement>, LexError> {
    let tokens = tokenize(sql)?;
    let mut out = Vec::new();
    let mut begin = 0usize;
    let mut cur: Vec<Token> = Vec::new();
    let mut depth = 0i32;
    // `CREATE TRIGGER ... BEGIN ...; ...; END` has semicolons inside.
    let mut in_trigger_body = false;
    let flush = |cur: &mut Vec<Token>, begin: usize, end: usize, out: &mut Vec<Statement>| {
        if cur.is_empty() {
            return;
        }
        let start = cur[0].start;
        let stop = cur.last().map(|t| t.end).unwrap_or(end);
        let text = sql[start..stop].to_string();
        let tokens = cur
            .iter()
            .map(|t| Token {
                kind: t.kind,
                start: t.start - start,
                end: t.end - start,
            })
            .collect();
        let _ = begin;
        out.push(Statement { text, tokens });
        cur.clear();
    };
    for t in tokens {
        let s = &sql[t.start..t.end];
        if t.kind == Tok::Punct && s == "(" {
            depth += 1;
        } else if t.kind == Tok::Punct && s == ")" {
            depth -= 1;
        }
        if t.kind == Tok::Word && !cur.is_empty() {
            let first = &sql[cur[0].start..cur[0].end];
            if first.eq_ignore_ascii_case("CREATE")
                && cur
                    .iter()
                    .take(4)
                    .any(|x| sql[x.start..x.end].eq_ignore_ascii_case("TRIGGER"))
            {
                if s.eq_ignore_ascii_case("BEGIN") {
                    in_trigger_body = true;
                } else if s.eq_ignore_ascii_case("END") {
                    in_trigger_body = false;
                }
            }
        }
        if t.kind == Tok::Punct && s == ";" && depth <= 0 && !in_trigger_body {
            flush(&mut cur, begin, t.start, &mut out);
            begin = t.end;
            depth = 0;
            continue;
        }
        cur.push(t);
    }
    flush(&mut cur, begin, sql.len(), &mut out);
    Ok(out)
}

/// What the server does with a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `BEGIN`, `START TRANSACTION` (with modes, which are accepted).
    Begin {
        read_only: bool,
    },
    /// `COMMIT`, `END`.
    Commit,
    /// `ROLLBACK`, `ABORT` (not `ROLLBACK TO`).
    Rollback,
    /// `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`: SQLite runs them, the server
    /// tracks them.
    Savepoint {
        kind: SavepointKind,
        sql: String,
    },
    /// `SET [SESSION|LOCAL] name {=|TO} value`, `SET TIME ZONE x`.
    Set {
        name: String,
        value: Option<String>,
    },
    /// `RESET name`, `RESET ALL` (name `ALL`).
    Reset {
        name: String,
    },
    /// `SHOW name`, `SHOW ALL`.
    Show {
        name: String,
    },
    /// `DISCARD ALL` and friends.
    Discard,
    CreateDatabase {
        name: String,
    },
    DropDatabase {
        name: String,
        if_exists: bool,
    },
    /// Accepted and ignored for compatibility (`LISTEN`, `UNLISTEN`, `CHECKPOINT`...).
    Ignored {
        tag: String,
    },
    /// Refused with feature_not_supported and a reason.
    Unsupported {
        what: String,
    },
    /// Everything else: SQL for SQLite (rewritten).
    Sql(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavepointKind {
    Savepoint,
    Release,
    RollbackTo,
}

fn unquote_value(s: &str) -> String {
    let t = s.trim();
    if t.len() >= 2 && t.starts_with('\'') && t.ends_with('\'') {
        t[1..t.len() - 1].replace("''", "'")
    } else if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        t[1..t.len() - 1].replace("\"\"", "\"")
    } else {
        t.to_string()
    }
}

fn ident(st: &Statement, n: usize) -> Option<String> {
    let t = st.tokens.get(n)?;
    let s = &st.text[t.start..t.end];
    match t.kind {
        Tok::Word => Some(s.to_ascii_lowercase()),
        Tok::QuotedIdent => Some(unquote_value(s)),
        _ => None,
    }
}

/// Classifies a statement and rewrites it for SQLite where needed.
pub fn classify(st: &Statement) -> Command {
    let w0 = st.word(0).unwrap_or_default();
    let w1 = st.word(1).unwrap_or_default();
    match w0.as_str() {
        "BEGIN" | "START" => {
            let words = st.words_from(1);
            let read_only = words.windows(2).any(|w| w[0] == "READ" && w[1] == "ONLY");
            Command::Begin { read_only }
        }
        "COMMIT" | "END" => Command::Commit,
        "ABORT" => Command::Rollback,
        "ROLLBACK" => {
            let words = st.words_from(1);
            let to = words.iter().position(|w| w == "TO");
            match to {
                Some(p) => {
                    let rest: Vec<&str> = words[p + 1..]
                        .iter()
                        .map(String::as_str)
                        .filter(|w| *w != "SAVEPOINT")
                        .collect();
                    let name = rest.first().copied().unwrap_or_default();
                    Command::Savepoint {
                        kind: SavepointKind::RollbackTo,
                        sql: format!("ROLLBACK TO SAVEPOINT {name}"),
                    }
                }
                None => Command::Rollback,
            }
        }
        "SAVEPOINT" => Command::Savepoint {
            kind: SavepointKind::Savepoint,
            sql: st.text.clone(),
        },
        "RELEASE" => Command::Savepoint {
            kind: SavepointKind::Release,
            sql: st.text.clone(),
        },
        "SET" => classify_set(st),
        "RESET" => Command::Reset {
            name: ident(st, 1).unwrap_or_else(|| "all".into()),
        },
        "SHOW" => {
            let words: Vec<String> = st.tokens[1..]
                .iter()
                .map(|t| st.text[t.start..t.end].to_ascii_lowercase())
                .collect();
            Command::Show {
                name: words.join(" ").replace(" . ", "."),
            }
        }
        "DISCARD" => Command::Discard,
        "CREATE" if w1 == "DATABASE" => match ident(st, 2) {
            Some(name) => Command::CreateDatabase { name },
            None => Command::Unsupported {
                what: "CREATE DATABASE needs a name".into(),
            },
        },
        "DROP" if w1 == "DATABASE" => {
            let if_exists =
                st.word(2).as_deref() == Some("IF") && st.word(3).as_deref() == Some("EXISTS");
            let at = if if_exists { 4 } else { 2 };
            match ident(st, at) {
                Some(name) => Command::DropDatabase { name, if_exists },
                None => Command::Unsupported {
                    what: "DROP DATABASE needs a name".into(),
                },
            }
        }
        "LISTEN" | "UNLISTEN" | "CHECKPOINT" => Command::Ignored { tag: w0 },
        "COPY" => Command::Unsupported {
            what: "COPY is not supported; use INSERT (several rows per statement) or psql's \\i"
                .into(),
        },
        "NOTIFY" | "DECLARE" | "FETCH" | "MOVE" | "CLOSE" | "LOCK" | "PREPARE" | "EXECUTE"
        | "DEALLOCATE" | "GRANT" | "REVOKE" | "TRUNCATE" | "CLUSTER" | "COMMENT" => {
            if w0 == "DEALLOCATE" {
                // psycopg and JDBC send it; protocol-level statements are
                // closed with Close, so there is nothing to do.
                return Command::Ignored { tag: w0 };
            }
            if w0 == "TRUNCATE" {
                let mut at = 1;
                if st.word(at).as_deref() == Some("TABLE") {
                    at += 1;
                }
                if let Some(t) = st.tokens.get(at) {
                    let name = &st.text[t.start..];
                    return Command::Sql(format!("DELETE FROM {name}"));
                }
            }
            Command::Unsupported {
                what: format!("{w0} is not supported by atrest"),
            }
        }
        _ => Command::Sql(rewrite(st)),
    }
}

fn classify_set(st: &Statement) -> Command {
    let mut at = 1;
    if matches!(st.word(at).as_deref(), Some("SESSION") | Some("LOCAL")) {
        at += 1;
        if st.word(at).as_deref() == Some("CHARACTERISTICS") {
            return Command::Ignored { tag: "SET".into() };
        }
    }
    if st.word(at).as_deref() == Some("TRANSACTION") {
        return Command::Ignored { tag: "SET".into() };
    }
    if st.word(at).as_deref() == Some("TIME") && st.word(at + 1).as_deref() == Some("ZONE") {
        let value = st
            .tokens
            .get(at + 2)
            .map(|t| unquote_value(&st.text[t.start..]));
        return Command::Set {
            name: "timezone".into(),
            value,
        };
    }
    if st.word(at).as_deref() == Some("NAMES") {
        let value = st
            .tokens
            .get(at + 1)
            .map(|t| unquote_value(&st.text[t.start..]));
        return Command::Set {
            name: "client_encoding".into(),
            value,
        };
    }
    // name may be dotted (extension.setting).
    let mut name = String::new();
    let mut i = at;
    while let Some(t) = st.tokens.get(i) {
        let s = &st.text[t.start..t.end];
        if t.kind == Tok::Punct && s == "=" || t.kind == Tok::Word && s.eq_ignore_ascii_case("TO") {
            break;
        }
        name.push_str(&s.to_ascii_lowercase());
        i += 1;
    }
    let value = st.tokens.get(i + 1).map(|t| {
        let raw = &st.text[t.start..];
        if raw.trim().eq_ignore_ascii_case("DEFAULT") {
            None
        } else {
            Some(unquote_value(raw))
        }
    });
    Command::Set {
        name,
        value: value.flatten(),
    }
}

fn is_keyword(w: &str) -> bool {
    const KW: &[&str] = &[
        "SELECT",
        "WHERE",
        "AND",
        "OR",
        "NOT",
        "ON",
        "IN",
        "AS",
        "BY",
        "THEN",
        "ELSE",
        "WHEN",
        "CASE",
        "RETURNING",
        "VALUES",
        "SET",
        "FROM",
        "JOIN",
        "HAVING",
        "IS",
        "LIKE",
        "BETWEEN",
        "DISTINCT",
        "ALL",
        "ANY",
        "EXISTS",
        "USING",
        "WITH",
        "LIMIT",
        "OFFSET",
    ];
    KW.iter().any(|k| k.eq_ignore_ascii_case(w))
}

/// PostgreSQL type names in casts, mapped to what SQLite calls them.
fn cast_type(pg: &str) -> &'static str {
    let t = pg.trim().to_ascii_lowercase();
    let base = t.split(['(', '[']).next().unwrap_or("").trim();
    match base {
        "int" | "int2" | "int4" | "int8" | "integer" | "bigint" | "smallint" | "serial"
        | "bigserial" | "oid" => "INTEGER",
        "float" | "float4" | "float8" | "real" | "double precision" | "double" => "REAL",
        "numeric" | "decimal" => "NUMERIC",
        "bytea" => "BLOB",
        "bool" | "boolean" => "BOOLEAN",
        _ => "TEXT",
    }
}

/// SQL functions PostgreSQL lets you call without parentheses.
const BARE_FUNCTIONS: &[&str] = &[
    "current_user",
    "session_user",
    "current_role",
    "current_catalog",
    "current_schema",
];

/// Rewrites the PostgreSQL spellings SQLite lacks:
/// - `expr::type` (expr a literal, identifier, parameter, or a
///   parenthesised or called expression) to `CAST(expr AS type)`;
/// - `serial`/`bigserial`/`smallserial` column types to `INTEGER`, so that
///   `id serial PRIMARY KEY` is SQLite's auto-assigned rowid.
pub fn rewrite(st: &Statement) -> String {
    let toks = &st.tokens;
    let text = &st.text;
    let has_cast = toks
        .iter()
        .any(|t| t.kind == Tok::Punct && &text[t.start..t.end] == "::");
    let is_create_table = st.word(0).as_deref() == Some("CREATE")
        && st.words_from(1).iter().take(3).any(|w| w == "TABLE");
    let is_bare_function = |i: usize| {
        let t = toks[i];
        t.kind == Tok::Word
            && BARE_FUNCTIONS
                .iter()
                .any(|f| f.eq_ignore_ascii_case(&text[t.start..t.end]))
            && toks.get(i + 1).is_none_or(|n| &text[n.start..n.end] != "(")
            && (i == 0 || &text[toks[i - 1].start..toks[i - 1].end] != ".")
    };
    let has_bare = (0..toks.len()).any(is_bare_function);
    if !has_cast && !is_create_table && !has_bare {
        return text.clone();
    }
    // Edits as (start, end, replacement), applied right to left.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    if is_create_table {
        for t in toks {
            let s = &text[t.start..t.end];
            if t.kind == Tok::Word
                && (s.eq_ignore_ascii_case("serial")
                    || s.eq_ignore_ascii_case("bigserial")
                    || s.eq_ignore_ascii_case("smallserial")
                    || s.eq_ignore_ascii_case("serial4")
                    || s.eq_ignore_ascii_case("serial8"))
            {
                edits.push((t.start, t.end, "INTEGER".into()));
            }
        }
    }
    for (i, t) in toks.iter().enumerate() {
        if is_bare_function(i) {
            edits.push((t.start, t.end, format!("{}()", &text[t.start..t.end])));
        }
    }
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        if !(t.kind == Tok::Punct && &text[t.start..t.end] == "::") || i == 0 {
            i += 1;
            continue;
        }
        // Operand: walk back over one primary expression.
        let mut j = i - 1;
        let close = &text[toks[j].start..toks[j].end];
        if toks[j].kind == Tok::Punct && close == ")" {
            let mut depth = 0;
            loop {
                let s = &text[toks[j].start..toks[j].end];
                if toks[j].kind == Tok::Punct && s == ")" {
                    depth += 1;
                } else if toks[j].kind == Tok::Punct && s == "(" {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                if j == 0 {
                    break;
                }
                j -= 1;
            }
            // A function call (name written right before the parenthesis,
            // and not a keyword such as IN or VALUES): include its name.
            if j > 0
                && matches!(toks[j - 1].kind, Tok::Word | Tok::QuotedIdent)
                && toks[j - 1].end == toks[j].start
                && !is_keyword(&text[toks[j - 1].start..toks[j - 1].end])
            {
                j -= 1;
            }
        } else if toks[j].kind == Tok::Punct {
            i += 1;
            continue;
        }
        // Qualified names: a.b.c
        while j >= 2
            && toks[j - 1].kind == Tok::Punct
            && &text[toks[j - 1].start..toks[j - 1].end] == "."
            && matches!(toks[j - 2].kind, Tok::Word | Tok::QuotedIdent)
        {
            j -= 2;
        }
        // Type name: words, optional (n[,m]), optional [].
        let mut k = i + 1;
        let type_start = toks.get(k).map(|t| t.start);
        let Some(type_start) = type_start else {
            break;
        };
        let mut type_end = type_start;
        let multi = ["double", "character", "timestamp", "time", "bit"];
        while let Some(tk) = toks.get(k) {
            let s = &text[tk.start..tk.end];
            if tk.kind == Tok::Word || tk.kind == Tok::QuotedIdent {
                type_end = tk.end;
                k += 1;
                // Multi-word types: double precision, character varying,
                // timestamp with(out) time zone.
                let lower = s.to_ascii_lowercase();
                let next = toks
                    .get(k)
                    .map(|n| text[n.start..n.end].to_ascii_lowercase());
                let continues = match next.as_deref() {
                    Some("precision") | Some("varying") => true,
                    Some("with") | Some("without") | Some("time") | Some("zone") => {
                        multi.contains(&lower.as_str())
                            || lower == "with"
                            || lower == "without"
                            || lower == "time"
                    }
                    _ => false,
                };
                if !continues {
                    break;
                }
            } else {
                break;
            }
        }
        if let Some(tk) = toks.get(k) {
            if tk.kind == Tok::Punct && &text[tk.start..tk.end] == "(" {
                while let Some(tk) = toks.get(k) {
                    type_end = tk.end;
                    k += 1;
                    if tk.kind == Tok::Punct && &text[tk.start..tk.end] == ")" {
                        break;
                    }
                }
            }
        }
        while let (Some(a), Some(b)) = (toks.get(k), toks.get(k + 1)) {
            if &text[a.start..a.end] == "[" && &text[b.start..b.end] == "]" {
                type_end = b.end;
                k += 2;
            } else {
                break;
            }
        }
        if type_end == type_start {
            i += 1;
            continue;
        }
        let operand = &text[toks[j].start..toks[i - 1].end];
        let ty = cast_type(&text[type_start..type_end]);
        edits.push((toks[j].start, type_end, format!("CAST({operand} AS {ty})")));
        i = k;
    }
    // Nested casts (a::int::text) produce overlapping edits; apply only
    // the outermost of overlapping ones by applying right to left and
    // skipping edits that overlap an applied one.
    edits.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    let mut out = text.clone();
    let mut last_start = usize::MAX;
    for (s, e, r) in edits {
        if e > last_start {
            continue;
        }
        out.replace_range(s..e, &r);
        last_start = s;
    }
    out
}

/// The command tag verb of a SQL statement for SQLite (`INSERT`, `SELECT`,
/// `CREATE TABLE`...), used to build the CommandComplete tag.
pub fn tag_verb(st: &Statement) -> String {
    let w0 = st.word(0).unwrap_or_default();
    match w0.as_str() {
        "WITH" => {
            // The main verb follows the CTE list at depth 0.
            let mut depth = 0;
            for t in &st.tokens {
                let s = &st.text[t.start..t.end];
                match (t.kind, s) {
                    (Tok::Punct, "(") => depth += 1,
                    (Tok::Punct, ")") => depth -= 1,
                    (Tok::Word, w) if depth == 0 => {
                        let u = w.to_ascii_uppercase();
                        if matches!(
                            u.as_str(),
                            "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "VALUES"
                        ) {
                            return if u == "VALUES" { "SELECT".into() } else { u };
                        }
                    }
                    _ => {}
                }
            }
            "SELECT".into()
        }
        "VALUES" | "TABLE" => "SELECT".into(),
        "REPLACE" => "INSERT".into(),
        "CREATE" | "DROP" | "ALTER" => {
            let mut words = vec![w0.clone()];
            for w in st.words_from(1) {
                if matches!(
                    w.as_str(),
                    "TEMP" | "TEMPORARY" | "UNIQUE" | "OR" | "REPLACE" | "VIRTUAL"
                ) {
                    continue;
                }
                words.push(w);
                break;
            }
            words.join(" ")
        }
        "" => "SELECT".into(),
        _ => w0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut v = split(sql).unwrap();
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    #[test]
    fn splits_at_top_level_semicolons_only() {
        let v = split("SELECT 'a;b'; SELECT \"x;\" FROM t; -- c;\n SELECT $$;$$; ;;").unwrap();
        let texts: Vec<_> = v.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            texts,
            ["SELECT 'a;b'", "SELECT \"x;\" FROM t", "SELECT $$;$$"]
        );
        assert!(split(" ; ;\n-- only a comment\n").unwrap().is_empty());
        let trig =
            "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE u SET n = n + 1; END; SELECT 1";
        assert_eq!(split(trig).unwrap().len(), 2);
        assert_eq!(split("SELECT /* a /* nested */ ; */ 1").unwrap().len(), 1);
    }

    #[test]
    fn unterminated_quotes_are_errors() {
        assert!(matches!(
            split("SELECT 'abc"),
            Err(LexError::UnterminatedString(7))
        ));
        assert!(matches!(
            split("SELECT \"abc"),
            Err(LexError::UnterminatedIdent(_))
        ));
        assert!(matches!(
            split("SELECT /* x"),
            Err(LexError::UnterminatedComment(_))
        ));
        assert!(matches!(
            split("SELECT $a$ x"),
            Err(LexError::UnterminatedDollar(_))
        ));
    }

    #[test]
    fn classifies_transaction_and_session_commands() {
        assert_eq!(classify(&one("BEGIN")), Command::Begin { read_only: false });
        assert_eq!(
            classify(&one(
                "start transaction isolation level serializable, read only"
            )),
            Command::Begin { read_only: true }
        );
        assert_eq!(classify(&one("end")), Command::Commit);
        assert_eq!(classify(&one("ROLLBACK WORK")), Command::Rollback);
        assert!(matches!(
            classify(&one("rollback to savepoint s1")),
            Command::Savepoint {
                kind: SavepointKind::RollbackTo,
                ..
            }
        ));
        assert_eq!(
            classify(&one("SET statement_timeout = '5s'")),
            Command::Set {
                name: "statement_timeout".into(),
                value: Some("5s".into())
            }
        );
        assert_eq!(
            classify(&one("set session application_name to 'my app'")),
            Command::Set {
                name: "application_name".into(),
                value: Some("my app".into())
            }
        );
        assert_eq!(
            classify(&one("SET TIME ZONE 'UTC'")),
            Command::Set {
                name: "timezone".into(),
                value: Some("UTC".into())
            }
        );
        assert_eq!(
            classify(&one("SHOW server_version")),
            Command::Show {
                name: "server_version".into()
            }
        );
        assert_eq!(
            classify(&one("create database \"Sales\"")),
            Command::CreateDatabase {
                name: "Sales".into()
            }
        );
        assert_eq!(
            classify(&one("DROP DATABASE IF EXISTS x")),
            Command::DropDatabase {
                name: "x".into(),
                if_exists: true
            }
        );
        assert!(matches!(
            classify(&one("COPY t FROM STDIN")),
            Command::Unsupported { .. }
        ));
        assert_eq!(
            classify(&one("TRUNCATE TABLE t")),
            Command::Sql("DELETE FROM t".into())
        );
    }

    #[test]
    fn rewrites_casts_and_serial() {
        let r = |s: &str| match classify(&one(s)) {
            Command::Sql(s) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(r("SELECT 1::int8"), "SELECT CAST(1 AS INTEGER)");
        assert_eq!(
            r("SELECT $1::text, 'x'::bytea"),
            "SELECT CAST($1 AS TEXT), CAST('x' AS BLOB)"
        );
        assert_eq!(
            r("SELECT t.a::double precision FROM t"),
            "SELECT CAST(t.a AS REAL) FROM t"
        );
        assert_eq!(
            r("SELECT (a + 1)::numeric(10,2) FROM t"),
            "SELECT CAST((a + 1) AS NUMERIC) FROM t"
        );
        assert_eq!(
            r("SELECT count(*)::int FROM t"),
            "SELECT CAST(count(*) AS INTEGER) FROM t"
        );
        assert_eq!(
            r("SELECT x FROM t WHERE a = (1)::int"),
            "SELECT x FROM t WHERE a = CAST((1) AS INTEGER)"
        );
        assert_eq!(r("SELECT '::'::text"), "SELECT CAST('::' AS TEXT)");
        assert_eq!(
            r("CREATE TABLE t (id serial PRIMARY KEY, n bigserial)"),
            "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)"
        );
        assert_eq!(
            r("SELECT current_user, t.current_user, current_schema()"),
            "SELECT current_user(), t.current_user, current_schema()"
        );
        // Untouched when there is nothing to rewrite, including "serial" as data.
        assert_eq!(
            r("INSERT INTO t VALUES ('serial')"),
            "INSERT INTO t VALUES ('serial')"
        );
    }

    #[test]
    fn tag_verbs() {
        assert_eq!(
            tag_verb(&one("with x as (select 1) insert into t select * from x")),
            "INSERT"
        );
        assert_eq!(
            tag_verb(&one("CREATE UNIQUE INDEX i ON t(a)")),
            "CREATE INDEX"
        );
        assert_eq!(tag_verb(&one("create temp table t(a)")), "CREATE TABLE");
        assert_eq!(tag_verb(&one("values (1)")), "SELECT");
    }
}
