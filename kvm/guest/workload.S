# Ferry's KVM guest workload: 64-bit, ring 3, no stack, no interrupts.
#
# One copy runs on every vCPU over its own partition of memory and of the disk. The VMM
# sets, before the first entry:
#   rdi = guest-physical address of the partition's first page
#   rsi = pages in the partition (n > 0)
#   r12 = stride in pages, 0 < stride < n (or 1 when n = 1), coprime with n
#   r9  = first block of the disk partition, r10 = its blocks (0 = no disk)
#   r13 = this vCPU's I/O page: block buffer for the block device
#   rbx = passes done, r8 = steps done in this pass, r14 = page of the next step,
#   r15 = blocks written, r11 = r15 mod r10 (all 0 at the start), xmm0 = rbx
#
# A pass visits every page once, in the order p(i) = i * stride mod n, and adds 1 to the
# page's first quadword. So after a pass every page holds the pass count, and at any
# moment the pages in visiting order read pass+1 up to the step reached and pass after
# it: exactly one step (the oracle the VMM and QEMU's migration test check).
#
# Ports (32-bit, all from ring 3 thanks to IOPL 3):
#   in  0x10  every 64 steps and at each pass end: the VMM paces the guest here and
#             answers how many blocks to write now
#   out 0x11  pass finished, eax = passes done
#   out 0x12  the guest's own check failed: eax = 1 SSE copy lost, 2 disk read-back wrong
#   out 0x20  write block eax from the I/O page
#   out 0x21  read block eax into the I/O page
#
# The pass count is also kept in xmm0 and compared at every pass end, so FPU/SSE state
# lost by a migration stops the guest with an error. Before a block is overwritten it is
# read back and must hold the sequence number written one lap earlier.

    .code64
    .globl _start

    .macro CHUNK
    mov $0x10, %dx
    in %dx, %eax
    mov %eax, %ecx
    call_blocks_\@:
    test %ecx, %ecx
    jz done_\@
    test %r10, %r10
    jz done_\@
    lea (%r9,%r11), %rax
    mov $0x21, %dx
    out %eax, %dx
    cmp %r10, %r15
    jb fresh_\@
    mov %r15, %rax
    sub %r10, %rax
    cmp (%r13), %rax
    jne disk_bad
fresh_\@:
    mov %r15, (%r13)
    lea (%r9,%r11), %rax
    mov %rax, 8(%r13)
    mov %rbx, 16(%r13)
    mov $0x20, %dx
    out %eax, %dx
    inc %r15
    inc %r11
    cmp %r10, %r11
    jb next_\@
    xor %r11, %r11
next_\@:
    dec %ecx
    jmp call_blocks_\@
done_\@:
    .endm

_start:
step:
    mov %r14, %rax
    shl $12, %rax
    incq (%rdi,%rax)
    inc %r8
    add %r12, %r14
    cmp %rsi, %r14
    jb 1f
    sub %rsi, %r14
1:
    cmp %rsi, %r8
    je pass_end
    test $63, %r8
    jnz step
    CHUNK
    jmp step

pass_end:
    movq %xmm0, %rax
    cmp %rbx, %rax
    jne sse_bad
    inc %rbx
    movq %rbx, %xmm0
    xor %r8, %r8
    xor %r14, %r14
    mov %ebx, %eax
    mov $0x11, %dx
    out %eax, %dx
    CHUNK
    jmp step

sse_bad:
    mov $1, %eax
    jmp fail
disk_bad:
    mov $2, %eax
fail:
    mov $0x12, %dx
    out %eax, %dx
    jmp fail
