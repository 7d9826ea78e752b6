//! The turn state machine driven with forced logits: which token comes next is chosen by
//! the test, so stop strings, the context rule, aborts and follow-ups are checked exactly,
//! on both drivers (blocking, as natively, and async, as in a browser). The model is the
//! real SmolLM2 GGUF on the CPU: its forward passes run, their rows are replaced.

use std::rc::Rc;

use burn::tensor::Tensor;
use vidllm_core::GenerateError;
use vidllm_core::gguf::Gguf;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::{Conversation, FinishReason, Finished, GenerateParams, Model, Piece, Prompt, load_llama};
use vidllm_tests::smollm2_path;

fn conversation(context: usize) -> Conversation {
    let g = Gguf::open(smollm2_path()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let model = load_llama(&g, &vidllm_tests::cpu()).unwrap();
    Conversation::new(Rc::new(Model::Text(model)), Rc::new(tok), context)
}

/// A logits row that makes greedy sampling pick `id`.
fn one_hot(vocab: usize, id: u32) -> Vec<f32> {
    let mut row = vec![0.0; vocab];
    row[id as usize] = 10.0;
    row
}

/// Which driver runs the answer.
#[derive(Clone, Copy, Debug)]
enum Driver {
    Blocking,
    Async,
}

/// Run the answer with rows forcing `forced` in turn (then the last one again), collecting
/// the pieces; `stop_after` pieces, the driver aborts.
fn run(conv: &mut Conversation, driver: Driver, forced: &[u32], stop_after: Option<usize>) -> (Vec<Piece>, Finished) {
    let vocab = conv.model().decoder().cfg.vocab_size;
    let mut at = 0;
    let mut next_row = move |_: Tensor<2>| {
        let id = forced[at.min(forced.len() - 1)];
        at += 1;
        Ok::<_, GenerateError>(one_hot(vocab, id))
    };
    let mut pieces = Vec::new();
    let mut on_piece = |p: &Piece| {
        pieces.push(p.clone());
        stop_after.is_none_or(|n| pieces.len() < n)
    };
    let finished = match driver {
        Driver::Blocking => conv.answer_with(&mut next_row, &mut on_piece),
        Driver::Async => {
            pollster::block_on(conv.answer_async_with(|t| std::future::ready(next_row(t)), || std::future::ready(()), &mut on_piece))
        }
    }
    .unwrap();
    (pieces, finished)
}

fn params(max_tokens: usize, stop: &[&str]) -> GenerateParams {
    GenerateParams { max_tokens, stop: stop.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn ids(conv: &Conversation, text: &str) -> Vec<u32> {
    conv.tokenizer().encode(text, false).unwrap()
}

#[test]
fn a_stop_string_is_held_back_then_cut() {
    for driver in [Driver::Blocking, Driver::Async] {
        let mut conv = conversation(256);
        let forced = ids(&conv, "Hello world STOP and more");
        conv.ask(Prompt::Question("Say hello."), params(50, &["STOP"])).unwrap();
        let (pieces, f) = run(&mut conv, driver, &forced, None);
        let emitted: String = pieces.iter().map(|p| p.text.as_str()).collect::<String>() + &f.tail;
        println!("{driver:?}: pieces {:?}, tail {:?}, reason {:?}", pieces.iter().map(|p| &p.text).collect::<Vec<_>>(), f.tail, f.reason);
        assert_eq!(f.reason, FinishReason::StopString);
        assert_eq!(emitted, "Hello world ");
        assert_eq!(f.text, "Hello world ");
        // No piece ever showed a prefix of the stop string.
        assert!(pieces.iter().all(|p| !p.text.contains('S')));
    }
}

#[test]
fn the_context_fills_at_the_same_token_on_both_drivers() {
    let mut ends = Vec::new();
    for driver in [Driver::Blocking, Driver::Async] {
        let mut conv = conversation(24);
        let prompt = ids(&conv, "one two three four five six seven eight");
        let filler = ids(&conv, " yes");
        conv.ask(Prompt::Tokens(&prompt), params(1000, &[])).unwrap();
        let (_, f) = run(&mut conv, driver, &filler, None);
        println!("{driver:?}: {} prompt tokens, {} generated, {:?}", prompt.len(), f.tokens.len(), f.reason);
        assert_eq!(f.reason, FinishReason::ContextFull);
        // Every position of the cache is used, and the last sampled token is the one
        // that found no room.
        assert_eq!(f.tokens.len(), 24 - prompt.len() + 1);
        assert_eq!(conv.history().len(), 24 + 1);
        ends.push(f.tokens.len());
        // A follow-up cannot fit: refused, nothing changes.
        let before = conv.history().to_vec();
        assert!(matches!(conv.ask(Prompt::Question("more?"), params(5, &[])), Err(GenerateError::PromptTooLong { .. })));
        assert_eq!(conv.history(), before);
    }
    assert_eq!(ends[0], ends[1]);
}

#[test]
fn abort_then_follow_up_continues_the_conversation() {
    for driver in [Driver::Blocking, Driver::Async] {
        let mut conv = conversation(256);
        let words = ids(&conv, " la la la la la la la la");
        conv.ask(Prompt::Question("Sing."), params(50, &[])).unwrap();
        let (pieces, f) = run(&mut conv, driver, &words, Some(2));
        assert_eq!(f.reason, FinishReason::Aborted);
        assert_eq!((pieces.len(), f.tokens.len()), (2, 2), "the answer ends right after the piece that asked to stop");
        let so_far = conv.history().to_vec();
        // The follow-up goes through the chat template and continues the cached turns.
        conv.ask(Prompt::Question("Again?"), params(3, &[])).unwrap();
        let (_, f) = run(&mut conv, driver, &words, None);
        assert_eq!(f.reason, FinishReason::MaxTokens);
        assert_eq!(&conv.history()[..so_far.len()], so_far.as_slice());
        let turn = conv.tokenizer().decode(&conv.history()[so_far.len()..]);
        println!("{driver:?}: follow-up turn {turn:?}");
        assert!(turn.contains("<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n"), "{turn:?}");
    }
}

#[test]
fn a_refused_prompt_changes_nothing_and_the_next_one_answers() {
    let mut conv = conversation(64);
    let long = "word ".repeat(200);
    match conv.ask(Prompt::Question(&long), params(5, &[])) {
        Err(e @ GenerateError::PromptTooLong { .. }) => assert_eq!(e.kind(), "ContextFullError"),
        other => panic!("expected PromptTooLong, got {:?}", other.err()),
    }
    assert!(conv.history().is_empty());
    let oks = ids(&conv, " ok ok ok");
    conv.ask(Prompt::Question("Hi"), params(3, &[])).unwrap();
    let (_, f) = run(&mut conv, Driver::Blocking, &oks, None);
    assert_eq!(f.tokens.len(), 3);
    // Asking while an answer streams is refused too.
    conv.ask(Prompt::Question("One"), params(3, &[])).unwrap();
    assert!(matches!(conv.ask(Prompt::Question("Two"), params(3, &[])), Err(GenerateError::Busy)));
}

#[test]
fn an_end_of_generation_token_ends_the_answer_unemitted() {
    let mut conv = conversation(128);
    let eos = conv.tokenizer().eos.unwrap();
    let mut forced = ids(&conv, "Fine");
    forced.push(eos);
    conv.ask(Prompt::Question("How are you?"), params(20, &[])).unwrap();
    let (pieces, f) = run(&mut conv, Driver::Blocking, &forced, None);
    assert_eq!(f.reason, FinishReason::EndOfText);
    assert_eq!(f.text, "Fine");
    assert!(pieces.iter().all(|p| p.id != eos));
}
