//! Helpers shared by the engine's integration tests: real catalog models from the cache.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of a fetched catalog model; fails with the command that fetches it.
pub fn model(name: &str) -> PathBuf {
    tandem_models::fetch::resolve(name).unwrap_or_else(|e| {
        panic!("{e}\n(the README's test command fetches the test models: `bash ci/test`)")
    })
}

/// Five short coding prompts (openings of HumanEval-style problems).
pub const PROMPTS: [&str; 5] = [
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold.\n    \"\"\"\n",
    "def truncate_number(number: float) -> float:\n    \"\"\" Given a positive floating point number, return its decimal part.\n    \"\"\"\n",
    "def fib(n: int):\n    \"\"\"Return n-th Fibonacci number.\n    >>> fib(10)\n    55\n    \"\"\"\n",
    "The capital of France is",
    "def is_palindrome(text: str):\n    \"\"\"\n    Checks if given string is a palindrome\n    \"\"\"\n",
];

/// Index and value of the largest entry, and the gap to the second largest.
pub fn top2(v: &[f32]) -> (usize, f32, f32) {
    let mut best = 0;
    for i in 0..v.len() {
        if v[i] > v[best] {
            best = i;
        }
    }
    let second = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != best)
        .map(|(_, x)| *x)
        .fold(f32::NEG_INFINITY, f32::max);
    (best, v[best], v[best] - second)
}
