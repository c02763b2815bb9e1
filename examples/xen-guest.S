/*
 * A minimal PVH guest for the real-Xen tests (assembled by examples/xen-dom0.sh).
 *
 * Xen starts it at the XEN_ELFNOTE_PHYS32_ENTRY point in flat 32-bit protected
 * mode, paging off. It prints through Xen's debug port 0xe9 (shown as "(dN) ..."
 * on Xen's console with guest_loglvl=all).
 *
 * Parent: fills TABLE_PAGES pages at TABLE with word[i] = i * 0x9e3779b1, prints
 * MCDIST_FORK, then spins until %ebx changes. The host pauses it there, reads its
 * memory and gives each clone its vCPU state with %ebx = clone id, %edx = clones.
 * Clone: sums the words of the table pages p with p % clones == id (every page
 * it reads is paged in by the memtap on first touch), prints
 * "MCDIST_RESULT id=<hex> n=<hex> sum=<hex>", and halts with interrupts off,
 * which powers the domain off.
 */
    .set TABLE, 0x400000
    .set TABLE_PAGES, 2048

    .section .note.Xen, "a"
    .align 4
    .long 4, 4, 18              /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .align 4
    .long _start

    .text
    .code32
    .globl _start
_start:
    cli
    mov $stack_top, %esp
    mov $msg_up, %esi
    call puts

    xor %ecx, %ecx
1:  mov %ecx, %eax
    imul $0x9e3779b1, %eax, %eax
    mov %eax, TABLE(,%ecx,4)
    inc %ecx
    cmp $(TABLE_PAGES * 1024), %ecx
    jb 1b

    mov $msg_fork, %esi
    call puts
    mov $0xffffffff, %ebx
2:  pause
    cmp $0xffffffff, %ebx
    je 2b

    /* A clone: %ebx = id, %edx = number of clones. */
    mov $msg_clone, %esi
    call puts
    xor %edi, %edi              /* sum */
    mov %ebx, %ecx              /* page */
3:  cmp $TABLE_PAGES, %ecx
    jae 5f
    mov %ecx, %esi
    shl $12, %esi
    add $TABLE, %esi
    xor %eax, %eax
4:  add (%esi,%eax,4), %edi
    inc %eax
    cmp $1024, %eax
    jb 4b
    add %edx, %ecx
    jmp 3b
5:  mov %edx, %ebp
    mov $msg_id, %esi
    call puts
    mov %ebx, %eax
    call puthex
    mov $msg_n, %esi
    call puts
    mov %ebp, %eax
    call puthex
    mov $msg_sum, %esi
    call puts
    mov %edi, %eax
    call puthex
    mov $msg_nl, %esi
    call puts
6:  cli
    hlt
    jmp 6b

/* Print the NUL-terminated string at %esi. */
puts:
    lodsb
    test %al, %al
    jz 1f
    out %al, $0xe9
    jmp puts
1:  ret

/* Print %eax as 8 hex digits; clobbers %eax, %ecx, %edx. */
puthex:
    mov $8, %ecx
1:  rol $4, %eax
    mov %eax, %edx
    and $0xf, %edx
    push %eax
    movb hexdigits(%edx), %al
    out %al, $0xe9
    pop %eax
    dec %ecx
    jnz 1b
    ret

    .section .rodata
hexdigits: .ascii "0123456789abcdef"
msg_up:    .asciz "mcdist-guest: up, filling the table\n"
msg_fork:  .asciz "MCDIST_FORK\n"
msg_clone: .asciz "mcdist-guest: clone running\n"
msg_id:    .asciz "MCDIST_RESULT id="
msg_n:     .asciz " n="
msg_sum:   .asciz " sum="
msg_nl:    .asciz "\n"

    .bss
    .align 4096
stack:
    .skip 4096
stack_top:
