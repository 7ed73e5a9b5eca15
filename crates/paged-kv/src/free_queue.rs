//! The free-block queue: a doubly linked list threaded through two index
//! arrays, in eviction order (head = next block to hand out).

use crate::BlockId;

const NIL: u32 = u32::MAX;

/// Free blocks in eviction order. Every operation is O(1): push at either end,
/// pop the head, and remove any block from the middle (a prefix-cache hit
/// takes a freed-but-cached block back). Links are indices, not pointers.
#[derive(Clone, Debug)]
pub(crate) struct FreeBlockQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    in_queue: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeBlockQueue {
    /// A queue holding blocks `0..num_blocks` in ascending order.
    pub(crate) fn new_full(num_blocks: usize) -> Self {
        let n = num_blocks as u32;
        let prev = (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        let next = (0..n).map(|i| if i + 1 == n { NIL } else { i + 1 }).collect();
        Self {
            prev,
            next,
            in_queue: vec![true; num_blocks],
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            len: num_blocks,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains(&self, block: BlockId) -> bool {
        self.in_queue[block as usize]
    }

    /// Takes the block at the head (the least valuable one).
    pub(crate) fn pop_front(&mut self) -> Option<BlockId> {
        if self.head == NIL {
            return None;
        }
        let block = self.head;
        self.remove(block);
        Some(block)
    }

    /// Appends `block` at the tail: evicted last.
    pub(crate) fn push_back(&mut self, block: BlockId) {
        debug_assert!(!self.in_queue[block as usize]);
        let b = block as usize;
        self.prev[b] = self.tail;
        self.next[b] = NIL;
        if self.tail == NIL {
            self.head = block;
        } else {
            self.next[self.tail as usize] = block;
        }
        self.tail = block;
        self.in_queue[b] = true;
        self.len += 1;
    }

    /// Prepends `block` at the head: handed out first.
    pub(crate) fn push_front(&mut self, block: BlockId) {
        debug_assert!(!self.in_queue[block as usize]);
        let b = block as usize;
        self.next[b] = self.head;
        self.prev[b] = NIL;
        if self.head == NIL {
            self.tail = block;
        } else {
            self.prev[self.head as usize] = block;
        }
        self.head = block;
        self.in_queue[b] = true;
        self.len += 1;
    }

    /// Unlinks `block`, which must be in the queue.
    pub(crate) fn remove(&mut self, block: BlockId) {
        let b = block as usize;
        debug_assert!(self.in_queue[b]);
        let (p, n) = (self.prev[b], self.next[b]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b] = NIL;
        self.next[b] = NIL;
        self.in_queue[b] = false;
        self.len -= 1;
    }

    /// Blocks from head to tail.
    pub(crate) fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let b = cur;
            cur = self.next[b as usize];
            Some(b)
        })
    }

    /// Checks the links against the membership flags and the length.
    pub(crate) fn check(&self) -> Result<(), String> {
        let forward: Vec<BlockId> = self.iter().take(self.len + 1).collect();
        if forward.len() != self.len {
            return Err(format!("free queue walks {} blocks, len says {}", forward.len(), self.len));
        }
        let mut back = Vec::with_capacity(self.len);
        let mut cur = self.tail;
        while cur != NIL && back.len() <= self.len {
            back.push(cur);
            cur = self.prev[cur as usize];
        }
        back.reverse();
        if back != forward {
            return Err("free queue forward and backward walks differ".into());
        }
        let flagged = self.in_queue.iter().filter(|&&f| f).count();
        if flagged != self.len || forward.iter().any(|&b| !self.in_queue[b as usize]) {
            return Err("free queue membership flags disagree with the links".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_pop_remove_keep_order() {
        let mut q = FreeBlockQueue::new_full(5);
        assert_eq!(q.iter().collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        q.remove(2);
        q.remove(0);
        q.remove(4);
        assert_eq!(q.iter().collect::<Vec<_>>(), [1, 3]);
        q.push_back(4);
        q.push_front(0);
        q.push_back(2);
        assert_eq!(q.iter().collect::<Vec<_>>(), [0, 1, 3, 4, 2]);
        assert_eq!(q.pop_front(), Some(0));
        assert_eq!(q.len(), 4);
        q.check().unwrap();
        while q.pop_front().is_some() {}
        assert_eq!(q.len(), 0);
        assert_eq!(q.pop_front(), None);
        q.push_front(3);
        assert_eq!(q.iter().collect::<Vec<_>>(), [3]);
        q.check().unwrap();
        assert!(q.contains(3) && !q.contains(1));
    }
}
