//! Grammars against the real default model's tokenizer (SmolLM2-135M-Instruct,
//! from its GGUF): a seeded random walk through each grammar's masks must
//! produce text in the grammar's language, and masks must behave under
//! rollback, cloning and a padded vocabulary.

use std::path::PathBuf;
use std::sync::OnceLock;

use pagoda_models::{ModelFiles, Tokenizer};
use pagoda_structured::{CompiledGrammar, GrammarCompiler, GrammarMatcher, GrammarSpec};
use serde_json::{json, Value};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$PAGODA_TEST_MODEL`, else models/smollm2-135m-instruct/; absent, the
/// test fails (CI fetches the model first; a silent skip would hide that).
fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("PAGODA_TEST_MODEL") {
        let path = PathBuf::from(&p);
        assert!(path.exists(), "PAGODA_TEST_MODEL={p} does not exist (run `bash scripts/fetch-model.sh`)");
        return path;
    }
    let default = workspace_root().join("models/smollm2-135m-instruct");
    assert!(
        default.is_dir(),
        "the structured-output tests need SmolLM2-135M-Instruct: run `bash scripts/fetch-model.sh` \
         (or set PAGODA_TEST_MODEL)"
    );
    default
}

struct Setup {
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    vocab_size: usize,
    compiler: GrammarCompiler,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let files = ModelFiles::open(model_path()).expect("open the test model");
        let vocab_size = files.config.vocab_size;
        let eos = files.generation.eos_token_ids.clone();
        let compiler = GrammarCompiler::new(&files.tokenizer, &eos, vocab_size).expect("grammar compiler");
        Setup { tokenizer: files.tokenizer, eos, vocab_size, compiler }
    })
}

fn compile(spec: GrammarSpec) -> CompiledGrammar {
    setup().compiler.compile(&spec).unwrap_or_else(|e| panic!("{spec:?} does not compile: {e}"))
}

/// splitmix64: a deterministic choice without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn allowed(words: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        for bit in 0..32 {
            if w & (1 << bit) != 0 {
                out.push((i * 32 + bit) as u32);
            }
        }
    }
    out
}

fn mask_of(m: &mut GrammarMatcher, vocab_size: usize) -> Vec<u32> {
    let mut words = vec![0u32; vocab_size.div_ceil(32)];
    m.fill_mask(&mut words);
    words
}

/// Walks the grammar: fill the mask, pick an allowed token at random (EOS,
/// when allowed, half the time), accept it; until EOS. Returns the text.
fn generate(grammar: &CompiledGrammar, seed: u64) -> String {
    let s = setup();
    let tokenizer_vocab = s.tokenizer.vocab_size();
    let mut rng = Rng(seed);
    let mut m = grammar.matcher();
    let mut tokens = Vec::new();
    loop {
        assert!(tokens.len() < 400, "no end after 400 tokens: {:?}", s.tokenizer.decode(&tokens, false));
        let words = mask_of(&mut m, s.vocab_size);
        let ids = allowed(&words);
        assert!(!ids.is_empty(), "empty mask after {:?}", s.tokenizer.decode(&tokens, false));
        assert!(ids.iter().all(|&t| (t as usize) < tokenizer_vocab), "a padding id is allowed");
        if m.is_terminated() {
            assert!(ids.iter().all(|t| s.eos.contains(t)), "a terminated grammar allows only EOS");
        }
        let eos_allowed: Vec<u32> = ids.iter().copied().filter(|t| s.eos.contains(t)).collect();
        let token = if !eos_allowed.is_empty() && rng.next() % 2 == 0 {
            eos_allowed[0]
        } else {
            ids[(rng.next() % ids.len() as u64) as usize]
        };
        m.accept_token(token).unwrap_or_else(|e| panic!("allowed token {token} refused: {e}"));
        if s.eos.contains(&token) {
            assert!(m.is_terminated(), "EOS accepted but the matcher goes on");
            break;
        }
        tokens.push(token);
    }
    s.tokenizer.decode(&tokens, true).expect("decode")
}

fn generate_json(grammar: &CompiledGrammar, seed: u64) -> Value {
    let text = generate(grammar, seed);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

fn str_chars(v: &Value) -> usize {
    v.as_str().unwrap_or_else(|| panic!("{v} is not a string")).chars().count()
}

/// An integer in `lo..=hi` (JSON's `-0` included: serde_json reads it as a float).
fn int_in(v: &Value, lo: i64, hi: i64) -> bool {
    v.as_f64().is_some_and(|f| f.fract() == 0.0 && (lo as f64..=hi as f64).contains(&f))
}

#[test]
fn nested_object_schema() {
    let g = compile(GrammarSpec::JsonSchema(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "minLength": 1, "maxLength": 10},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "address"],
        "additionalProperties": false
    })));
    for seed in 0..4 {
        let v = generate_json(&g, seed);
        let obj = v.as_object().expect("an object");
        assert_eq!(obj.len(), 3, "{v}");
        assert!(str_chars(&v["name"]) <= 12, "{v}");
        assert!(int_in(&v["age"], 0, 150), "{v}");
        let addr = v["address"].as_object().expect("address object");
        assert_eq!(addr.len(), 2, "{v}");
        assert!((1..=10).contains(&str_chars(&v["address"]["city"])), "{v}");
        let zip = v["address"]["zip"].as_str().expect("zip");
        assert!(zip.len() == 5 && zip.bytes().all(|b| b.is_ascii_digit()), "{v}");
    }
}

#[test]
fn enum_and_boolean_schema() {
    let g = compile(GrammarSpec::JsonSchema(json!({
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
            "size": {"type": "string", "enum": ["S", "M", "XL"]},
            "note": {"type": "string", "maxLength": 4}
        },
        "required": ["color", "ok", "size"],
        "additionalProperties": false
    })));
    for seed in 10..16 {
        let v = generate_json(&g, seed);
        assert!(["red", "green", "blue"].contains(&v["color"].as_str().expect("color")), "{v}");
        assert!(v["ok"].is_boolean(), "{v}");
        assert!(["S", "M", "XL"].contains(&v["size"].as_str().expect("size")), "{v}");
        if let Some(note) = v.get("note") {
            assert!(str_chars(note) <= 4, "{v}");
        }
        assert!(v.as_object().unwrap().keys().all(|k| ["color", "ok", "size", "note"].contains(&k.as_str())));
    }
}

#[test]
fn array_schema() {
    let g = compile(GrammarSpec::JsonSchema(json!({
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 2, "maxItems": 4},
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 1,
                "maxItems": 3
            },
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "number", "minimum": -100, "maximum": 100},
                        "y": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
                    },
                    "required": ["x", "y"],
                    "additionalProperties": false
                },
                "maxItems": 2
            }
        },
        "required": ["tags", "scores", "points"],
        "additionalProperties": false
    })));
    for seed in 20..24 {
        let v = generate_json(&g, seed);
        let tags = v["tags"].as_array().expect("tags");
        assert!((2..=4).contains(&tags.len()), "{v}");
        assert!(tags.iter().all(|t| str_chars(t) <= 5), "{v}");
        let scores = v["scores"].as_array().expect("scores");
        assert!((1..=3).contains(&scores.len()), "{v}");
        assert!(scores.iter().all(|s| int_in(s, -5, 5)), "{v}");
        let points = v["points"].as_array().expect("points");
        assert!(points.len() <= 2, "{v}");
        let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
        assert!(points.iter().all(|p| (-100.0..=100.0).contains(&num(&p["x"]))), "{v}");
        assert!(points.iter().all(|p| (0.0..1.0).contains(&num(&p["y"]))), "{v}");
    }
}

#[test]
fn json_is_compact() {
    let s = setup();
    let g = compile(GrammarSpec::JsonObject);
    // Every first token starts the object.
    let mut m = g.matcher();
    for t in allowed(&mask_of(&mut m, s.vocab_size)) {
        let text = s.tokenizer.decode(&[t], false).unwrap();
        assert!(text.starts_with('{'), "first token {t} = {text:?}");
    }
    let accepts = |text: &str| {
        let mut m = g.matcher();
        for t in s.tokenizer.encode(text, false).unwrap() {
            let words = mask_of(&mut m, s.vocab_size);
            if words[t as usize / 32] & (1 << (t % 32)) == 0 {
                assert!(m.accept_token(t).is_err(), "a token outside the mask is refused");
                return false;
            }
            m.accept_token(t).unwrap();
        }
        // Complete: only EOS is left.
        assert!(m.is_terminated(), "{text} is complete");
        let ids = allowed(&mask_of(&mut m, s.vocab_size));
        assert!(!ids.is_empty() && ids.iter().all(|t| s.eos.contains(t)));
        true
    };
    assert!(accepts(r#"{"a":[1,2.5,"x"],"b":{"c":null,"d":true}}"#));
    assert!(!accepts(r#"{"a": 1}"#), "whitespace is not free");
    assert!(!accepts("{\n\"a\":1}"), "whitespace is not free");
}

#[test]
fn choice() {
    let choices = ["Paris", "London", "New York", "Rio \"de\" Janeiro"];
    let g = compile(GrammarSpec::Choice(choices.iter().map(|s| s.to_string()).collect()));
    let mut seen = std::collections::HashSet::new();
    for seed in 30..42 {
        let text = generate(&g, seed);
        assert!(choices.contains(&text.as_str()), "{text:?}");
        seen.insert(text);
    }
    assert!(seen.len() > 1, "the walk reaches more than one choice");
}

#[test]
fn forced_tokens_follow_the_only_choice() {
    let s = setup();
    let g = compile(GrammarSpec::Choice(vec!["The quick brown fox".into()]));
    let mut m = g.matcher();
    let forced = m.forced_tokens();
    assert!(!forced.is_empty(), "a single choice forces tokens");
    let prefix = s.tokenizer.decode(&forced, false).unwrap();
    assert!("The quick brown fox".starts_with(&prefix), "{prefix:?}");
    for &t in &forced {
        m.accept_token(t).unwrap();
    }
    // The rest, by the masks: each is a single token.
    let mut tokens = forced;
    while !m.is_terminated() {
        let ids = allowed(&mask_of(&mut m, s.vocab_size));
        let t = *ids.iter().find(|t| !s.eos.contains(t)).expect("a non-EOS token");
        m.accept_token(t).unwrap();
        tokens.push(t);
    }
    assert_eq!(s.tokenizer.decode(&tokens, false).unwrap(), "The quick brown fox");
    assert!(m.forced_tokens().is_empty());
}

#[test]
fn regex() {
    for (rx, seeds) in
        [(r"\d{3}-\d{4}", 0..4), (r"(yes|no)", 4..10), (r"[a-z]{2,6}@example\.(com|org)", 10..14)]
    {
        let g = compile(GrammarSpec::Regex(rx.into()));
        let check = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
        for seed in seeds {
            let text = generate(&g, seed);
            assert!(check.is_match(&text), "{text:?} does not match {rx}");
        }
    }
}

const SQL_LARK: &str = r#"
start: select_statement
select_statement: "SELECT " column " from " table " where " condition
column: "col_1 " | "col_2 "
table: "table_1 " | "table_2 "
condition: column "= " number
number: "1 " | "2 "
"#;

const SQL_GBNF: &str = r#"
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"#;

#[test]
fn lark_and_gbnf_grammars() {
    let sql = regex::Regex::new("^SELECT col_[12]  from table_[12]  where col_[12] = [12] $").unwrap();
    for grammar in [SQL_LARK, SQL_GBNF] {
        let g = compile(GrammarSpec::Grammar(grammar.into()));
        for seed in 0..4 {
            let text = generate(&g, seed);
            assert!(sql.is_match(&text), "{text:?}");
        }
    }

    // Recursion, character classes and repetition in GBNF.
    let list = compile(GrammarSpec::Grammar(
        "root ::= \"[\" item (\",\" item){0,2} \"]\"  # a short list\n\
         item ::= [a-z]{1,4} | [0-9]+ | \"(\" item \")\"\n"
            .into(),
    ));
    for seed in 0..6 {
        let text = generate(&list, seed);
        assert!(in_list_language(&text), "{text:?}");
    }

    // Negated classes, escapes and `.` (any character).
    let quoted = compile(GrammarSpec::Grammar("root ::= \"\\\"\" [^\"\\\\]{1,5} \"\\\"\" .\n".into()));
    let check = regex::Regex::new(r#"^"[^"\\]{1,5}"(?s:.)$"#).unwrap();
    for seed in 0..6 {
        let text = generate(&quoted, seed);
        assert!(check.is_match(&text), "{text:?}");
    }

    // The same shape in Lark, with a terminal.
    let list = compile(GrammarSpec::Grammar(
        "start: \"[\" item (\",\" item){0,2} \"]\"\nitem: WORD | NUM | \"(\" item \")\"\nWORD: /[a-z]{1,4}/\nNUM: /[0-9]+/\n"
            .into(),
    ));
    for seed in 0..6 {
        let text = generate(&list, seed);
        assert!(in_list_language(&text), "{text:?}");
    }
}

/// `[item(,item){0,2}]` with item = `[a-z]{1,4}` | `[0-9]+` | `(item)`.
fn in_list_language(text: &str) -> bool {
    fn item(s: &str) -> bool {
        if let Some(inner) = s.strip_prefix('(').and_then(|s| s.strip_suffix(')')) {
            return item(inner);
        }
        let words = (1..=4).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase());
        let number = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        words || number
    }
    let Some(body) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else { return false };
    let items: Vec<&str> = body.split(',').collect();
    items.len() <= 3 && items.iter().all(|i| item(i))
}

#[test]
fn invalid_specs_are_errors_with_messages() {
    let c = &setup().compiler;
    let cases = [
        (GrammarSpec::JsonSchema(json!({"type": "frobnicate"})), "invalid JSON schema"),
        (
            GrammarSpec::JsonSchema(json!({"type": "string", "minLength": 5, "maxLength": 2})),
            "invalid JSON schema",
        ),
        (GrammarSpec::JsonSchema(json!(42)), "invalid JSON schema"),
        (GrammarSpec::Regex("(abc".into()), "invalid regex"),
        (GrammarSpec::Regex("a{3,1}".into()), "invalid regex"),
        (GrammarSpec::Choice(vec![]), "invalid choice"),
        (GrammarSpec::Grammar("start: foo (".into()), "invalid grammar"),
        (GrammarSpec::Grammar("start: undefined_rule".into()), "invalid grammar"),
        (GrammarSpec::Grammar("".into()), "invalid grammar"),
        (GrammarSpec::Grammar("root ::= \"a".into()), "invalid grammar"),
        (GrammarSpec::Grammar("root ::= item".into()), "invalid grammar"),
    ];
    for (spec, prefix) in cases {
        let err = c.compile(&spec).expect_err(&format!("{spec:?} compiles"));
        let msg = err.to_string();
        assert!(msg.starts_with(prefix) && msg.len() > prefix.len() + 4, "{spec:?}: {msg:?}");
    }
}

#[test]
fn rollback_then_reaccept_gives_the_same_masks() {
    let s = setup();
    let g = compile(GrammarSpec::JsonSchema(json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": false
    })));
    let tokens = s.tokenizer.encode(r#"{"name":"bob","n":12}"#, false).unwrap();
    let mut m = g.matcher();
    let mut masks = Vec::new();
    for &t in &tokens {
        masks.push(mask_of(&mut m, s.vocab_size));
        m.accept_token(t).unwrap();
    }
    masks.push(mask_of(&mut m, s.vocab_size));
    assert!(m.is_terminated());

    // EOS after the end, then back over it and 4 more tokens.
    m.accept_token(s.eos[0]).unwrap();
    m.rollback(5).unwrap();
    let back = tokens.len() - 4;
    assert!(!m.is_terminated());
    assert_eq!(mask_of(&mut m, s.vocab_size), masks[back]);
    for (i, &t) in tokens[back..].iter().enumerate() {
        assert_eq!(mask_of(&mut m, s.vocab_size), masks[back + i]);
        m.accept_token(t).unwrap();
    }
    assert!(m.is_terminated());

    // All the way back to the start.
    m.rollback(tokens.len()).unwrap();
    assert_eq!(mask_of(&mut m, s.vocab_size), masks[0]);
    assert!(m.rollback(1).is_err(), "nothing left to roll back");
}

#[test]
fn a_cloned_matcher_is_independent() {
    let s = setup();
    let g = compile(GrammarSpec::Regex("(abc|abd)[0-9]{2}".into()));
    let tokens = s.tokenizer.encode("abd42", false).unwrap();
    let mut a = g.matcher();
    a.accept_token(tokens[0]).unwrap();
    let before = mask_of(&mut a, s.vocab_size);
    let mut b = a.clone();
    for &t in &tokens[1..] {
        a.accept_token(t).unwrap();
    }
    assert!(a.is_terminated());
    assert!(!b.is_terminated());
    assert_eq!(mask_of(&mut b, s.vocab_size), before);
    // b goes its own way.
    let mut rng = Rng(7);
    while !b.is_terminated() {
        let ids: Vec<u32> =
            allowed(&mask_of(&mut b, s.vocab_size)).into_iter().filter(|t| !s.eos.contains(t)).collect();
        b.accept_token(ids[(rng.next() % ids.len() as u64) as usize]).unwrap();
    }
    assert!(a.is_terminated());
}

#[test]
fn refused_tokens_leave_the_matcher_usable() {
    let s = setup();
    let g = compile(GrammarSpec::Choice(vec!["yes".into(), "no".into()]));
    let mut m = g.matcher();
    let x = s.tokenizer.encode("maybe", false).unwrap()[0];
    assert!(m.accept_token(x).is_err());
    assert!(m.accept_token(s.vocab_size as u32).is_err(), "past the vocabulary");
    assert!(m.accept_token(s.eos[0]).is_err(), "EOS before the grammar is complete");
    // Refusal without a mask computed (after rollback) also leaves it usable.
    m.rollback(0).unwrap();
    assert!(m.accept_token(x).is_err());
    for t in s.tokenizer.encode("yes", false).unwrap() {
        m.accept_token(t).unwrap();
    }
    assert!(m.is_terminated());
}

#[test]
fn padded_vocabulary_never_allows_padding() {
    let s = setup();
    let tokenizer_vocab = s.tokenizer.vocab_size();
    let padded = tokenizer_vocab + 77;
    let compiler = GrammarCompiler::new(&s.tokenizer, &s.eos, padded).unwrap();
    assert_eq!(compiler.vocab_size(), padded);
    let g = compiler.compile(&GrammarSpec::JsonObject).unwrap();
    let mut m = g.matcher();
    let mut words = vec![u32::MAX; padded.div_ceil(32)];
    let tokens = s.tokenizer.encode(r#"{"k":"v"}"#, false).unwrap();
    for &t in &tokens {
        m.fill_mask(&mut words);
        assert!(allowed(&words).iter().all(|&id| (id as usize) < tokenizer_vocab));
        m.accept_token(t).unwrap();
    }
    assert!(m.is_terminated());
    // A string's mask allows almost everything: still no padding.
    let mut m = compiler.compile(&GrammarSpec::Regex("[^\"]{0,20}".into())).unwrap().matcher();
    m.fill_mask(&mut words);
    let ids = allowed(&words);
    assert!(ids.len() > 1000 && ids.iter().all(|&id| (id as usize) < tokenizer_vocab));
}

#[test]
fn eos_fallback_and_absent_tokenizer() {
    let s = setup();
    // Ids past the vocabulary are dropped; the tokenizer's own EOS stands in.
    assert!(GrammarCompiler::new(&s.tokenizer, &[u32::MAX], s.vocab_size).is_ok());
    let absent = Tokenizer::absent("test", Default::default());
    let err = GrammarCompiler::new(&absent, &s.eos, s.vocab_size).unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}
