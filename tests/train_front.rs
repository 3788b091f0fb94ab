//! The front end of training: `train LOSS with OPTIMIZER(...)` and `frozen` params, parsed and
//! lowered into `ir::Training` (loss, optimizer with its defaults, frozen params by full name),
//! and every malformed form rejected at its span. `train`, `with` and `frozen` stay usable as
//! names.

use std::collections::BTreeSet;
use tpc::diag::SourceFile;
use tpc::driver::{compile_global, Error};
use tpc::ir::{Optimizer, Training};
use tpc::lower::{lower_program, Lowered};
use tpc::syntax::parse;

const MLP: &str = "mesh tp
dim B = 4, H = 8
input x : f32[B, H]
param w1 : f32[H, H] @ [_, tp]
param w2 : f32[H, H] frozen @ [tp, _]
h = gelu(x @ w1)
y = h @ w2
loss = mean(mean(y * y, 1), 0)
output loss
";

/// Lowers `text` (named `t.tpl`); panics with the rendered error.
fn lowered(text: &str) -> Lowered {
    let src = SourceFile::new("t.tpl", text);
    let render = |e: Error| -> String { e.render(Some(&src)) };
    let module = parse(text).unwrap_or_else(|e| panic!("{}", render(e.into())));
    lower_program(&module, "t.tpl", &[]).unwrap_or_else(|e| panic!("{}", render(e.into())))
}

fn training(text: &str) -> Training {
    lowered(text).training.expect("the program trains")
}

/// The rendered user error of `text`, which must start with `error[code]` and point at
/// `t.tpl:line:col`.
fn error(text: &str, code: &str, at: &str) -> String {
    let src = SourceFile::new("t.tpl", text);
    let out = match compile_global(&src, &[]) {
        Ok(_) => panic!("compiled:\n{text}"),
        Err(e) => {
            assert!(!e.is_internal(), "internal: {e}");
            e.render(Some(&src))
        }
    };
    assert!(out.starts_with(&format!("error[{code}]")), "{out}");
    assert!(
        out.contains(&format!("t.tpl:{at}")),
        "expected t.tpl:{at} in\n{out}"
    );
    out
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn adamw_gets_its_documented_defaults() {
    let t = training(&format!("{MLP}train loss with adamw(lr=1e-3)\n"));
    assert_eq!(
        t.optimizer,
        Optimizer::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01
        }
    );
    assert_eq!(t.frozen, names(&["w2"]));
    assert_eq!((t.span.line, t.span.col), (10, 1));
}

#[test]
fn every_argument_is_taken_by_keyword_or_position() {
    let t = training(&format!(
        "{MLP}train loss with adamw(2e-4, beta2=0.95, eps=1e-6, weight_decay=0, beta1=0.8)\n"
    ));
    assert_eq!(
        t.optimizer,
        Optimizer::AdamW {
            lr: 2e-4,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.0
        }
    );
    let t = training(&format!("{MLP}train loss with sgd(lr=0.1)\n"));
    assert_eq!(
        t.optimizer,
        Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.0
        }
    );
    let t = training(&format!(
        "{MLP}train loss with sgd(lr=0.5 / H, momentum=0.9)\n"
    ));
    assert_eq!(
        t.optimizer,
        Optimizer::Sgd {
            lr: 0.0625,
            momentum: 0.9
        }
    );
}

#[test]
fn the_loss_is_the_named_value() {
    let l = lowered(&format!("{MLP}train loss with sgd(lr=0.1)\n"));
    let t = l.training.unwrap();
    let out = l.graph.outputs().iter().find(|o| o.name == "loss").unwrap();
    assert_eq!(t.loss, out.value);
}

#[test]
fn a_program_without_train_has_no_training_and_frozen_changes_nothing() {
    let l = lowered(MLP);
    assert!(l.training.is_none());
    let plain = lowered(&MLP.replace(" frozen", ""));
    assert_eq!(
        tpc::emit::text::print(&l.graph),
        tpc::emit::text::print(&plain.graph)
    );
}

#[test]
fn frozen_goes_before_or_after_the_spec_and_keeps_it() {
    for decl in [
        "param w2 : f32[H, H] frozen @ [tp, _]",
        "param w2 : f32[H, H] @ [tp, _] frozen",
    ] {
        let text = MLP.replace("param w2 : f32[H, H] frozen @ [tp, _]", decl);
        let l = lowered(&format!("{text}train loss with sgd(lr=0.1)\n"));
        assert_eq!(l.training.unwrap().frozen, names(&["w2"]), "{decl}");
        let printed = tpc::emit::text::print(&l.graph);
        assert!(
            printed.contains("param w2") && printed.contains("[tp, _]"),
            "{printed}"
        );
    }
}

#[test]
fn a_frozen_param_of_a_block_is_frozen_in_every_instance() {
    let text = "dim B = 2, H = 4, L = 3
input x : f32[B, H]
block layer(h: f32[B, H]) -> f32[B, H] {
  param w : f32[H, H]
  param g : f32[H] frozen
  return rmsnorm(h @ w, g)
}
block stack(h: f32[B, H]) -> f32[B, H] {
  param bias : f32[H] frozen
  return repeat(2, layer, h) + bias
}
y = repeat(L, layer, x)
z = stack(y)
loss = mean(mean(z, 1), 0)
output loss
train loss with sgd(lr=0.1)
";
    let t = training(text);
    assert_eq!(
        t.frozen,
        names(&[
            "layer.0.g",
            "layer.1.g",
            "layer.2.g",
            "stack.bias",
            "stack.layer.0.g",
            "stack.layer.1.g",
        ])
    );
}

#[test]
fn train_with_and_frozen_are_still_names() {
    let text = "dim H = 4
input x : f32[H]
param w : f32[H]
frozen = x * w
with = frozen + 1.0
train = mean(with, 0)
output train
train train with sgd(lr=1)
";
    let t = training(text);
    assert!(t.frozen.is_empty());
    let text = "dim H = 4
input x : f32[H]
param w : f32[H]
frozen, other = split(x * w, 2)
loss = mean(frozen, 0)
output loss, other
";
    assert!(lowered(text).training.is_none());
}

#[test]
fn a_loss_that_is_not_an_f32_scalar_is_rejected_at_its_name() {
    let out = error(
        &format!("{MLP}train y with sgd(lr=0.1)\n"),
        "invalid",
        "10:7",
    );
    assert!(out.contains("`y` is f32[4,8]"), "{out}");
    let text = "dim H = 4\ninput i : i32[H]\ns = sum(i, 0)\noutput s\ntrain s with sgd(lr=1)\n";
    let out = error(text, "invalid", "5:7");
    assert!(out.contains("`s` is i32[]"), "{out}");
    let out = error(&format!("{MLP}train H with sgd(lr=1)\n"), "invalid", "10:7");
    assert!(out.contains("`H` is a dim"), "{out}");
    let out = error(
        &format!("{MLP}train lost with sgd(lr=1)\n"),
        "unknown_name",
        "10:7",
    );
    assert!(out.contains("did you mean `loss`?"), "{out}");
}

#[test]
fn bad_hyper_parameters_are_rejected_at_the_argument() {
    // (call, the argument's value as written, the message's start)
    let cases = [
        ("sgd(lr=0)", "0)", "`lr` = 0"),
        ("sgd(lr=-0.1)", "-0.1", "`lr` = -0.1"),
        ("sgd(lr=0.1, momentum=1)", "1)", "`momentum` = 1"),
        ("sgd(lr=0.1, momentum=-0.5)", "-0.5", "`momentum` = -0.5"),
        ("adamw(lr=1, beta1=1.5)", "1.5", "`beta1` = 1.5"),
        ("adamw(lr=1, beta2=1)", "1)", "`beta2` = 1"),
        ("adamw(lr=1, eps=0)", "0)", "`eps` = 0"),
        (
            "adamw(lr=1, weight_decay=-0.01)",
            "-0.01",
            "`weight_decay` = -0.01",
        ),
        ("adamw(lr=1e400)", "1e400", "`lr` = inf"),
    ];
    for (opt, value, what) in cases {
        let col = "train loss with ".len() + opt.find(value).unwrap() + 1;
        let text = format!("{MLP}train loss with {opt}\n");
        let out = error(&text, "bad_op", &format!("10:{col}"));
        assert!(out.contains(what), "{opt}: {out}");
        assert!(out.contains("usage: "), "{opt}: {out}");
    }
}

#[test]
fn malformed_optimizer_calls_are_rejected() {
    let out = error(
        &format!("{MLP}train loss with adam(lr=1)\n"),
        "bad_op",
        "10:17",
    );
    assert!(
        out.contains("unknown optimizer `adam`") && out.contains("`adamw`"),
        "{out}"
    );
    let out = error(&format!("{MLP}train loss with sgd()\n"), "bad_op", "10:1");
    assert!(out.contains("missing argument `lr`"), "{out}");
    let out = error(
        &format!("{MLP}train loss with sgd(lr=1, lr=2)\n"),
        "bad_op",
        "10:30",
    );
    assert!(out.contains("given twice"), "{out}");
    let out = error(
        &format!("{MLP}train loss with sgd(lr=1, nesterov=1)\n"),
        "bad_op",
        "10:27",
    );
    assert!(out.contains("no argument `nesterov`"), "{out}");
    let out = error(
        &format!("{MLP}train loss with sgd(lr=x)\n"),
        "bad_op",
        "10:24",
    );
    assert!(out.contains("needs a constant"), "{out}");
    let out = error(
        &format!("{MLP}train loss with sgd(1, 2, 3)\n"),
        "bad_op",
        "10:27",
    );
    assert!(out.contains("at most 2"), "{out}");
}

#[test]
fn a_second_train_statement_is_rejected_naming_the_first() {
    let text = format!("{MLP}train loss with sgd(lr=1)\ntrain loss with sgd(lr=2)\n");
    let out = error(&text, "second_train", "11:1");
    assert!(out.contains("first `train` here"), "{out}");
}

#[test]
fn train_is_a_top_level_statement_of_a_fixed_form() {
    let text = "dim H = 4
input x : f32[H]
block b(h: f32[H]) -> f32[H] {
  s = mean(h, 0)
  train s with sgd(lr=1)
  return h
}
y = b(x)
output y
";
    let out = error(text, "syntax", "5:3");
    assert!(
        out.contains("`train` statements are not allowed inside a block"),
        "{out}"
    );
    let out = error(
        &format!("{MLP}train loss wth sgd(lr=1)\n"),
        "syntax",
        "10:12",
    );
    assert!(out.contains("`with`"), "{out}");
    let out = error(&format!("{MLP}train loss with sgd\n"), "syntax", "10:20");
    assert!(out.contains("'('"), "{out}");
    let out = error(
        "dim H = 2\ninput x : f32[H] frozen\noutput x\n",
        "syntax",
        "2:18",
    );
    assert!(out.contains("input `x` cannot be `frozen`"), "{out}");
}
