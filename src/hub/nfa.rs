//! A Thompson automaton over characters, for topic selectors (URI
//! templates, URL patterns): compiled once, then simulated with an
//! explicit set of states, in time linear in the topic whatever the
//! pattern (no selector can make matching blow up), and without recursion
//! (matching runs on streams' threads, whose touched stack pages stay
//! resident).

/// A set of characters an instruction matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// One character.
    Char(char),
    /// Unreserved (`A-Z a-z 0-9 - . _ ~`).
    Unreserved,
    /// Unreserved, or reserved (`: / ? # [ ] @ ! $ & ' ( ) * + , ; =`).
    Reserved,
    /// A hexadecimal digit (of a `%XX`).
    Hex,
    /// Any character.
    Any,
    /// Any character but this one.
    Not(char),
}

impl Class {
    pub(crate) fn matches(self, c: char) -> bool {
        let unreserved = c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~');
        match self {
            Class::Char(x) => c == x,
            Class::Unreserved => unreserved,
            Class::Reserved => unreserved || ":/?#[]@!$&'()*+,;=".contains(c),
            Class::Hex => c.is_ascii_hexdigit(),
            Class::Any => true,
            Class::Not(x) => c != x,
        }
    }
}

/// A pattern, before it is compiled.
#[derive(Clone)]
pub(crate) enum Ast {
    Class(Class),
    Seq(Vec<Ast>),
    Alt(Vec<Ast>),
    Star(Box<Ast>),
    Opt(Box<Ast>),
}

/// An instruction of a compiled template (a Thompson automaton).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Inst {
    /// Consume a character of the class, then go to the instruction.
    Class(Class, usize),
    /// Go to both.
    Split(usize, usize),
    /// Go to.
    Jump(usize),
    /// The whole topic matched.
    Match,
}

/// A compiled URI template: an automaton simulated with an explicit set of
/// states, in time linear in the topic, with its state on the heap:
/// matching touches no more stack whatever the template. (A stream's
/// thread keeps every stack page it touches; a regular-expression
/// engine's search took one page more than a stream otherwise uses.)
#[derive(Debug, Clone)]
pub(crate) struct Nfa {
    pub(crate) prog: Vec<Inst>,
    /// For a program of at most [`SMALL`] instructions (most templates):
    /// what each instruction reaches without consuming, as a bit set, so
    /// that matching allocates nothing and keeps two small sets on the
    /// stack.
    pub(crate) closures: Option<Vec<Small>>,
}

/// Instructions a [`Small`] set holds.
pub(crate) const SMALL: usize = 256;
/// A set of instructions of a small program.
pub(crate) type Small = [u64; SMALL / 64];

impl Nfa {
    pub(crate) fn compile(ast: &Ast) -> Nfa {
        let mut prog = Vec::new();
        emit(ast, &mut prog);
        prog.push(Inst::Match);
        let mut nfa = Nfa {
            prog,
            closures: None,
        };
        if nfa.prog.len() <= SMALL {
            let n = nfa.prog.len();
            let (mut seen, mut work) = (vec![false; n], Vec::new());
            let closures = (0..n)
                .map(|pc| {
                    let mut list = Vec::new();
                    seen.iter_mut().for_each(|s| *s = false);
                    nfa.add(pc, &mut list, &mut seen, &mut work);
                    let mut set = [0u64; SMALL / 64];
                    for i in list {
                        set[i / 64] |= 1 << (i % 64);
                    }
                    set
                })
                .collect();
            nfa.closures = Some(closures);
        }
        nfa
    }

    /// About what the program takes in memory, in bytes.
    pub(crate) fn footprint(&self) -> usize {
        let closures = self.closures.as_ref().map_or(0, Vec::len);
        self.prog.len() * std::mem::size_of::<Inst>() + closures * std::mem::size_of::<Small>()
    }

    pub(crate) fn is_match(&self, topic: &str) -> bool {
        match &self.closures {
            Some(closures) => self.is_match_small(closures, topic),
            None => self.is_match_large(topic),
        }
    }

    /// Matching with the precomputed closures: no allocation, two sets.
    fn is_match_small(&self, closures: &[Small], topic: &str) -> bool {
        let mut current = closures[0];
        for c in topic.chars() {
            let mut next = [0u64; SMALL / 64];
            for (w, &word) in current.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let pc = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if let Inst::Class(class, to) = self.prog[pc]
                        && class.matches(c)
                    {
                        for (n, add) in next.iter_mut().zip(closures[to]) {
                            *n |= add;
                        }
                    }
                }
            }
            if next.iter().all(|&w| w == 0) {
                return false;
            }
            current = next;
        }
        let end = self.prog.len() - 1; // the one Match, last
        current[end / 64] & (1 << (end % 64)) != 0
    }

    fn is_match_large(&self, topic: &str) -> bool {
        let n = self.prog.len();
        let (mut current, mut next) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut seen = vec![false; n];
        let mut work = Vec::new();
        self.add(0, &mut current, &mut seen, &mut work);
        for c in topic.chars() {
            seen.iter_mut().for_each(|s| *s = false);
            next.clear();
            for &pc in &current {
                if let Inst::Class(class, to) = self.prog[pc]
                    && class.matches(c)
                {
                    self.add(to, &mut next, &mut seen, &mut work);
                }
            }
            std::mem::swap(&mut current, &mut next);
            if current.is_empty() {
                return false;
            }
        }
        current
            .iter()
            .any(|&pc| matches!(self.prog[pc], Inst::Match))
    }

    /// Adds `pc` and what it reaches without consuming a character: an
    /// iterative closure, no recursion.
    fn add(&self, pc: usize, list: &mut Vec<usize>, seen: &mut [bool], work: &mut Vec<usize>) {
        work.push(pc);
        while let Some(pc) = work.pop() {
            if std::mem::replace(&mut seen[pc], true) {
                continue;
            }
            match self.prog[pc] {
                Inst::Split(a, b) => {
                    work.push(b);
                    work.push(a);
                }
                Inst::Jump(to) => work.push(to),
                Inst::Class(..) | Inst::Match => list.push(pc),
            }
        }
    }
}

/// Appends the instructions of `ast`, which fall through to what comes
/// next. (The recursion is as deep as a template's few levels of nesting,
/// and runs when a selector is parsed, not when it matches.)
fn emit(ast: &Ast, prog: &mut Vec<Inst>) {
    match ast {
        Ast::Class(c) => {
            let at = prog.len();
            prog.push(Inst::Class(*c, at + 1));
        }
        Ast::Seq(items) => items.iter().for_each(|a| emit(a, prog)),
        Ast::Alt(options) => {
            // A split to each option but the last; each jumps to the end.
            let mut jumps = Vec::new();
            for (i, option) in options.iter().enumerate() {
                if i + 1 == options.len() {
                    emit(option, prog);
                    break;
                }
                let split = prog.len();
                prog.push(Inst::Split(split + 1, 0));
                emit(option, prog);
                jumps.push(prog.len());
                prog.push(Inst::Jump(0));
                let resume = prog.len();
                prog[split] = Inst::Split(split + 1, resume);
            }
            let end = prog.len();
            for j in jumps {
                prog[j] = Inst::Jump(end);
            }
        }
        Ast::Star(inner) => {
            let split = prog.len();
            prog.push(Inst::Split(split + 1, 0));
            emit(inner, prog);
            prog.push(Inst::Jump(split));
            let end = prog.len();
            prog[split] = Inst::Split(split + 1, end);
        }
        Ast::Opt(inner) => {
            let split = prog.len();
            prog.push(Inst::Split(split + 1, 0));
            emit(inner, prog);
            let end = prog.len();
            prog[split] = Inst::Split(split + 1, end);
        }
    }
}

pub(crate) fn literal(text: &str) -> Ast {
    Ast::Seq(text.chars().map(|c| Ast::Class(Class::Char(c))).collect())
}

/// A character a value may hold: one of `class`, or a percent-encoded one.
pub(crate) fn value_char(class: Class) -> Ast {
    Ast::Alt(vec![
        Ast::Class(class),
        Ast::Seq(vec![
            Ast::Class(Class::Char('%')),
            Ast::Class(Class::Hex),
            Ast::Class(Class::Hex),
        ]),
    ])
}
