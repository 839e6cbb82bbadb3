from codecage._cli import main

raise SystemExit(main())
