"""Tokenizer reference corpus (~60 strings) used by make_reference.py.

Each entry is (tag, text). Tags are stable identifiers the Rust tests may use.
Strings are chosen to exercise the byte-level BPE + "smollm" pre-tokenizer
(individual digits first, then the GPT-2 split regex), special-token
recognition and whitespace edge cases.
"""

CORPUS = [
    # --- trivial / edge -------------------------------------------------
    ("empty", ""),
    ("single_space", " "),
    ("single_char", "a"),
    ("hello", "Hello world"),
    ("hello_lead_space", " Hello world"),
    ("sentence", "The quick brown fox jumps over the lazy dog."),
    ("punct", "Hello, world! How are you? (fine) [ok] {yes} <no> ..."),
    # --- contractions ---------------------------------------------------
    ("contractions", "don't won't can't I'm you're we've they'd she'll it's"),
    ("contractions_upper", "I'LL DON'T WE'VE IT'S"),
    ("contractions_mixed", "I'Ll be there, y'all'd've"),
    ("apostrophe_curly", "don\u2019t stop"),
    # --- digits and numbers ---------------------------------------------
    ("digits_8", "12345678"),
    ("pi", "3.14159"),
    ("million", "1,000,000"),
    ("digits_in_words", "abc123def 4567 x9y"),
    ("space_digits", " 2024 and  42"),
    ("negative_sci", "-1.5e-10 + 6.022e23 = ?"),
    ("phone_date", "Call 555-0199 on 2024-03-15 at 09:30."),
    ("fullwidth_digits", "\uff11\uff12\uff13 and \u0661\u0662\u0663"),
    # --- whitespace -----------------------------------------------------
    ("tabs", "\tindented\twith\ttabs\t"),
    ("multi_spaces", "a  b   c    d     e"),
    ("trailing_spaces", "trailing spaces   "),
    ("leading_spaces", "    leading spaces"),
    ("newlines", "line1\nline2\n\nline4\n"),
    ("crlf", "windows\r\nline\r\n"),
    ("mixed_ws", " \t \n  \n\t\tx  \n "),
    ("only_newlines", "\n\n\n"),
    ("only_spaces", "        "),
    # --- unicode --------------------------------------------------------
    ("accents", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u00c5ngstr\u00f6m"),
    ("combining", "e\u0301 vs \u00e9"),
    ("german", "Stra\u00dfe Gr\u00f6\u00dfe \u00c4rger"),
    ("cjk_zh", "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u6211\u7231\u7f16\u7a0b\u3002"),
    ("cjk_ja", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a"),
    ("korean", "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4"),
    ("arabic", "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645"),
    ("hebrew_rtl_mix", "\u05e9\u05dc\u05d5\u05dd abc \u05e2\u05d5\u05dc\u05dd 123"),
    ("russian", "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0401\u0436"),
    ("greek_math", "\u03b1 + \u03b2 = \u03b3, \u2200x \u2208 \u211d: x\u00b2 \u2265 0"),
    ("devanagari", "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e"),
    # --- emoji ----------------------------------------------------------
    ("emoji_simple", "I love \U0001F355 and \U0001F680!"),
    ("emoji_zwj_family", "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466"),
    ("emoji_skin_tone", "\U0001F44D\U0001F3FD thumbs"),
    ("emoji_flag", "\U0001F1EB\U0001F1F7\U0001F1EF\U0001F1F5"),
    ("emoji_zwj_profession", "\U0001F469\u200d\U0001F4BB codes \u2764\ufe0f"),
    # --- source code ----------------------------------------------------
    ("rust", "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n}\n"),
    ("rust_generics", "impl<T: Clone + Send> Foo<T> for Bar<'a> where T: 'static {}"),
    ("python", "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"),
    ("python_dunder", "class A:\n\tdef __init__(self, **kwargs):\n\t\tself.x = kwargs.get('x', None)  # comment\n"),
    ("c", "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n"),
    ("javascript", "const add = (a, b) => a + b;\nconsole.log(`sum=${add(1, 2)}`); // => 3\n"),
    ("lisp", "(defun square (x) (* x x))\n(mapcar #'square '(1 2 3))"),
    ("json", "{\"key\": [1, 2.5, true, null], \"nested\": {\"a\": \"b\"}}"),
    ("html", "<div class=\"x\">&amp; &lt;tag&gt;</div>"),
    ("url_path", "https://example.com/path/to/file.txt?q=1&r=two#frag"),
    ("shell", "for f in *.rs; do wc -l \"$f\" | sort -n; done 2>/dev/null"),
    # --- special tokens written in text ---------------------------------
    ("chatml", "<|im_start|>user\nhi<|im_end|>"),
    ("chatml_full", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    ("endoftext", "text<|endoftext|>more"),
    ("special_adjacent", "<|im_end|><|im_start|><|endoftext|>"),
    ("special_spaced", " <|im_start|> assistant "),
    ("special_like_not", "<|im_start |> <im_start> <|unknown|>"),
    ("repo_tokens", "<repo_name>flora<file_sep>src/main.rs<filename>x"),
    # --- misc -----------------------------------------------------------
    ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism"),
    ("repeated", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("mixed_case", "camelCaseWord snake_case_word SCREAMING_CASE kebab-case-word"),
    ("control_chars", "bell\x07 nul\x00 del\x7f esc\x1b[0m"),
]
